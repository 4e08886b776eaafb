import pytest

from velcro.data import TASKS, get_task, parse_classes, resolve_task
from velcro.errors import VelcroError

# A few lines of ImageNet's LOC_synset_mapping.txt (index order), written out by hand.
WNIDS = {
    281: "n02123045 tabby, tabby cat",
    282: "n02123159 tiger cat",
    283: "n02123394 Persian cat",
    284: "n02123597 Siamese cat, Siamese",
    285: "n02124075 Egyptian cat",
}


def test_presets_hold_the_documented_imagenet_indices():
    assert get_task("cats").classes == (281, 282, 283, 284, 285)
    dogs = get_task("dogs").classes
    assert dogs[0] == 151 and dogs[-1] == 268 and len(dogs) == 118 == len(set(dogs))
    cars = set(get_task("CARS").classes)
    # WordNet's car/automobile subtree within ImageNet-1k
    assert cars == {407, 436, 468, 511, 609, 627, 656, 661, 751, 817}
    # the railway "passenger car, coach" and the trucks are not cars
    assert not cars & {705, 717, 734, 675, 864}
    assert set(TASKS) == {"cats", "dogs", "cars", "cifar-cats-dogs", "cifar-vehicles",
                          "cifar-animals"}


# CIFAR-10's classes.txt, as ../shared/data/cifar10/classes.txt holds it
CIFAR_CLASSES = ("0 airplane\n1 automobile\n2 bird\n3 cat\n4 deer\n5 dog\n6 frog\n7 horse\n"
                 "8 ship\n9 truck\n")


def test_cifar_presets_are_the_papers_tasks_by_name(tmp_path):
    from velcro.data import read_class_list

    listing = tmp_path / "classes.txt"
    listing.write_text(CIFAR_CLASSES)
    names = read_class_list(listing)
    assert names[3] == "cat" and len(names) == 10

    def named(task):
        return {names[i] for i in get_task(task).classes}

    assert named("cifar-cats-dogs") == {"cat", "dog"}
    assert named("cifar-vehicles") == {"airplane", "automobile", "ship", "truck"}
    assert named("cifar-animals") == {"bird", "cat", "deer", "dog", "frog", "horse"}
    # and by name, with the class list: what a user types
    assert parse_classes("cat,dog", names) == [3, 5]


def test_unknown_task_names_the_task_and_the_choices():
    with pytest.raises(VelcroError, match=r"unknown task 'birds'.*cats, dogs, cars"):
        get_task("birds")
    with pytest.raises(VelcroError, match="not both"):
        resolve_task("cats", "1,2")


def test_classes_accept_indices_ranges_and_wnids():
    assert parse_classes("285, 281-283,282") == [281, 282, 283, 285]
    class_list = [f"n{i:08d}" for i in range(1000)]
    for index, line in WNIDS.items():
        class_list[index] = line.split()[0]
    assert parse_classes("n02123394,n02124075,1", class_list) == [1, 283, 285]
    assert resolve_task(classes="3,1") == ("custom", [1, 3])
    assert resolve_task(classes=[5, 2, 5]) == ("custom", [2, 5])
    assert resolve_task() == (None, None)


@pytest.mark.parametrize("text, match", [
    ("281,cat", r"unknown class 'cat'.*--class-list"),
    ("10-3", "not a valid index or range"),
    ("", "empty"),
])
def test_bad_classes_name_the_culprit(text, match):
    with pytest.raises(VelcroError, match=match):
        parse_classes(text)


def test_classes_beyond_the_class_list_are_refused():
    with pytest.raises(VelcroError, match="class 7 is out of range.*5 classes"):
        parse_classes("1,7", ["a", "b", "c", "d", "e"])
    with pytest.raises(VelcroError, match="unknown class 'n99999999'.*not in the class list"):
        parse_classes("n99999999", ["n00000001"])


@pytest.mark.parametrize("classes", ["3", "7-7", [4], (4, 4)])
def test_a_single_class_task_is_refused(classes):
    # top-1 on a one-class task is reached by a constant model: "no loss" would mean nothing
    with pytest.raises(VelcroError, match="a single class") as caught:
        resolve_task(classes=classes)
    assert "\n" not in str(caught.value) and "at least two classes" in str(caught.value)


def test_a_single_class_task_is_refused_by_the_cli(tmp_path, capsys):
    from velcro.cli import main

    code = main(["calibrate", str(tmp_path), "--model", "resnet18", "--classes", "3",
                 "-o", str(tmp_path / "s.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--classes" in err[0] and "single class" in err[0]
    assert not (tmp_path / "s.safetensors").exists()
