"""Class-list files are untrusted input (bounded, text, printable names); CIFAR-10's numbered
``classes.txt`` names classes; folders named by index stay so beside a list of names; a task
on a subset of a dataset leaves its classes without images out, and messages count right."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from velcro.data import ImageFolder, ImageLoader, Preprocess, parse_classes, read_class_list
from velcro.data.folder import MAX_CLASS_LIST_BYTES
from velcro.errors import VelcroError

SMALL = Preprocess(resize=None, crop=8)
CIFAR_CLASSES = "".join(f"{i} {name}\n" for i, name in enumerate(
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]))


def make_folder(root, names, per_class=2):
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:04d}.png")


# ---- validation --------------------------------------------------------------------------

def test_an_oversized_class_list_is_refused_without_reading_it_all(tmp_path):
    listing = tmp_path / "huge.txt"
    with open(listing, "wb") as handle:
        handle.truncate(MAX_CLASS_LIST_BYTES + 10)  # sparse: no disk used
        handle.seek(0)
        handle.write(b"n01440764\n")
    with pytest.raises(VelcroError, match=r"huge.txt' is larger than 16 MiB"):
        read_class_list(listing)


@pytest.mark.parametrize("content, match", [
    (b"n01440764\n\x00\x01\x02binary\n", "NUL bytes"),
    (b"n01440764\n\xff\xfe\xfa\n", "not UTF-8"),
    (b"n01440764\nn0144\x1b[31mred\n", r"line 2: .* is not a class name"),
    (("n" + "x" * 300 + "\n").encode(), r"line 1: .* is not a class name"),
])
def test_a_class_list_that_is_not_text_names_the_file_and_line(tmp_path, content, match):
    listing = tmp_path / "classes.txt"
    listing.write_bytes(content)
    with pytest.raises(VelcroError, match=match) as info:
        read_class_list(listing)
    assert "classes.txt" in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_more_names_than_any_model_has_are_refused(tmp_path):
    listing = tmp_path / "many.txt"
    listing.write_text("".join(f"c{i}\n" for i in range(100_001)))
    with pytest.raises(VelcroError, match="more than 100,000 classes"):
        read_class_list(listing)


# ---- CIFAR-10's classes.txt and index folders --------------------------------------------

def test_numbered_lines_name_their_class(tmp_path):
    listing = tmp_path / "classes.txt"
    listing.write_text(CIFAR_CLASSES)
    assert read_class_list(listing)[:4] == ["airplane", "automobile", "bird", "cat"]
    # ImageNet's lists are not numbered: their first token stays the name
    listing.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    assert read_class_list(listing) == ["n01440764", "n01443537"]


def test_index_folders_keep_their_indices_beside_a_list_of_names(tmp_path):
    make_folder(tmp_path / "test", [str(i) for i in range(10)])
    listing = tmp_path / "classes.txt"
    listing.write_text(CIFAR_CLASSES)
    names = read_class_list(listing)
    classes = parse_classes("cat,dog", names)
    folder = ImageFolder(tmp_path / "test", classes=classes, class_list=listing,
                         preprocess=SMALL)
    assert folder.label_mode == "index"
    assert folder.class_to_index == {"3": 3, "5": 5}
    assert sorted(set(folder.targets)) == [3, 5] and len(folder) == 4


def test_index_folders_beside_imagenets_synset_words(tmp_path):
    make_folder(tmp_path / "images", ["151", "207", "281"])
    listing = tmp_path / "synset_words.txt"
    wnids = [f"n{9_000_000 + i:08d}" for i in range(1000)]
    wnids[207] = "n02099601"  # golden retriever
    listing.write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids)))
    folder = ImageFolder(tmp_path / "images", classes=parse_classes("n02099601,151",
                                                                    read_class_list(listing)),
                         class_list=listing, preprocess=SMALL)
    assert folder.class_to_index == {"151": 151, "207": 207}


# ---- tasks on a subset of a dataset -------------------------------------------------------

def test_classes_without_a_folder_are_left_out_when_asked(tmp_path):
    make_folder(tmp_path, ["151", "153", "300"])
    folder = ImageFolder(tmp_path, classes=range(151, 269), missing_classes="skip",
                         preprocess=SMALL)
    assert folder.classes == [151, 153]
    assert len(folder.missing_classes) == 116 and 152 in folder.missing_classes
    with pytest.raises(VelcroError, match=r"class 152 has no folder .*116 of the task's 118 "
                                          r"classes missing"):
        ImageFolder(tmp_path, classes=range(151, 269), preprocess=SMALL)


def test_a_task_none_of_whose_classes_is_here_says_which_are(tmp_path):
    make_folder(tmp_path, [str(i) for i in range(10)])
    with pytest.raises(VelcroError) as info:
        ImageFolder(tmp_path, classes=range(281, 286), missing_classes="skip",
                    preprocess=SMALL)
    message = str(info.value)
    assert "none of the task's 5 classes (281-285)" in message
    assert "class folders are 0-9" in message


# ---- counts in messages --------------------------------------------------------------------

def test_messages_count_one_as_one(tmp_path):
    make_folder(tmp_path, ["0", "1"], per_class=1)
    with pytest.raises(VelcroError) as info:
        ImageFolder(tmp_path, classes=[0, 7], preprocess=SMALL)
    assert "1 of the task's 2 classes missing" in str(info.value)
    (tmp_path / "0" / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    folder = ImageFolder(tmp_path, classes=[0], preprocess=SMALL)
    with pytest.raises(VelcroError) as info:
        list(ImageLoader(folder))
    assert "1 images" not in str(info.value)
    assert "the one image in" in str(info.value) and "could not be read" in str(info.value)
    with pytest.raises(VelcroError) as info:
        ImageFolder(tmp_path, classes=[7], missing_classes="skip", preprocess=SMALL)
    assert "1 classes" not in str(info.value) and "the task's 1 class (7)" in str(info.value)
