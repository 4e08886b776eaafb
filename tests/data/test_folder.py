import numpy as np
import pytest
import torch
from PIL import Image

from velcro.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolder,
    ImageLoader,
    Preprocess,
    read_class_list,
)
from velcro.data._preprocess import resized_size
from velcro.errors import VelcroError


def save_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)


def make_folder(root, names, per_class=2, size=(6, 8)):
    rng = np.random.default_rng(0)
    for name in names:
        for i in range(per_class):
            save_png(root / name / f"{i}.png", rng.integers(0, 255, (*size, 3)))
    return root


SMALL = Preprocess(resize=None, crop=None)


# ---- preprocessing ----------------------------------------------------------------------

def test_resized_size_follows_torchvisions_rule():
    # shorter side -> 256, longer side int(256 * long / short) (truncated)
    assert resized_size(500, 375, 256) == (341, 256)
    assert resized_size(375, 500, 256) == (256, 341)
    assert resized_size(300, 300, 256) == (256, 256)
    assert resized_size(1000, 333, 256) == (768, 256)  # 768.76... truncated


def test_default_transform_shape_and_normalisation_of_a_flat_image():
    colour = (200, 100, 50)
    image = Image.new("RGB", (500, 375), colour)
    tensor = Preprocess()(image)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    expected = [(c / 255 - m) / s
                for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    for channel, value in enumerate(expected):
        assert torch.allclose(tensor[channel], torch.tensor(value), atol=1e-6)


def test_center_crop_takes_the_middle_window_rounded_like_torchvision():
    # pixel value = column index, so the crop's first column tells its offset
    rows, cols = 10, 15
    pixels = np.tile(np.arange(cols, dtype=np.uint8)[None, :, None] * 10, (rows, 1, 3))
    pixels[:, :, 1] = np.arange(rows, dtype=np.uint8)[:, None] * 10
    crop = Preprocess(resize=None, crop=(4, 6), mean=(0, 0, 0), std=(1, 1, 1))
    tensor = crop(Image.fromarray(pixels))
    top, left = round((rows - 4) / 2), round((cols - 6) / 2)  # 3, round(4.5) = 4
    expected = pixels[top : top + 4, left : left + 6].transpose(2, 0, 1) / 255
    assert torch.allclose(tensor, torch.tensor(expected, dtype=torch.float32))
    assert left == 4  # banker's rounding, as torchvision's int(round(x))


def test_crop_larger_than_the_image_pads_with_zeros():
    image = Image.new("RGB", (2, 2), (255, 255, 255))
    tensor = Preprocess(resize=None, crop=4, mean=(0, 0, 0), std=(1, 1, 1))(image)
    expected = torch.zeros(3, 4, 4)
    expected[:, 1:3, 1:3] = 1.0
    assert torch.equal(tensor, expected)


def test_bilinear_resize_keeps_a_linear_ramp_linear():
    # a horizontal ramp 0, 2, 4, ... halved in width: output column i covers input
    # columns 2i and 2i+1 around centre 2i + 0.5, so a linear filter gives 2 * (2i + 0.5)
    ramp = np.tile((np.arange(128) * 2).astype(np.uint8)[None, :, None], (128, 1, 3))
    transform = Preprocess(resize=64, crop=None, mean=(0, 0, 0), std=(1, 1, 1))
    tensor = transform(Image.fromarray(ramp)) * 255
    assert tensor.shape == (3, 64, 64)
    interior = tensor[0, 32, 2:-2]
    expected = torch.arange(2, 62, dtype=torch.float32) * 4 + 1
    assert torch.allclose(interior, expected, atol=0.51)


def test_grey_images_and_settings_are_checked():
    tensor = Preprocess(resize=None, crop=None, mean=(0.5,), std=(0.5,), mode="L")(
        Image.new("L", (3, 2), 255))
    assert tensor.shape == (1, 2, 3) and torch.allclose(tensor, torch.ones(1, 2, 3))
    with pytest.raises(VelcroError, match="need 3 values"):
        Preprocess(mean=(0.5,))
    with pytest.raises(VelcroError, match="positive"):
        Preprocess(std=(1, 0, 1))


# ---- folders and labels -------------------------------------------------------------------

def test_folders_named_by_index_keep_their_index(tmp_path):
    folder = ImageFolder(make_folder(tmp_path, ["7", "281", "3"]), preprocess=SMALL)
    assert folder.label_mode == "index"
    assert folder.class_to_index == {"3": 3, "7": 7, "281": 281}
    assert len(folder) == 6 and folder.classes == [3, 7, 281]
    image, label = folder[0]
    assert folder.samples[0] == ("281/0.png", 281) and label == 281
    assert image.shape == (3, 6, 8)


def test_own_classes_are_numbered_in_sorted_order(tmp_path):
    folder = ImageFolder(make_folder(tmp_path, ["zebra", "ant", "moth"]), preprocess=SMALL)
    assert folder.label_mode == "sorted"
    assert folder.class_to_index == {"ant": 0, "moth": 1, "zebra": 2}


def test_wnid_folders_map_through_the_class_list(tmp_path):
    make_folder(tmp_path / "val", ["n02123159", "n02123045"])
    listing = tmp_path / "LOC_synset_mapping.txt"
    lines = [f"n{i:08d} class {i}" for i in range(1000)]
    lines[281], lines[282] = "n02123045 tabby, tabby cat", "n02123159 tiger cat"
    listing.write_text("\n".join(lines) + "\n")
    assert read_class_list(listing)[281] == "n02123045"
    folder = ImageFolder(tmp_path / "val", classes=[281], class_list=listing, preprocess=SMALL)
    assert folder.class_to_index == {"n02123045": 281}
    assert [label for _, label in folder.samples] == [281, 281]
    with pytest.raises(VelcroError, match="WordNet ids.*--class-list"):
        ImageFolder(tmp_path / "val", preprocess=SMALL)
    with pytest.raises(VelcroError, match="n02123159' is not in the class list"):
        ImageFolder(tmp_path / "val", class_list=["n02123045"], preprocess=SMALL)


def test_task_classes_select_folders_and_missing_ones_are_named(tmp_path):
    make_folder(tmp_path, ["281", "282", "5"])
    folder = ImageFolder(tmp_path, classes=[282, 281], preprocess=SMALL)
    assert folder.classes == [281, 282] and len(folder) == 4
    with pytest.raises(VelcroError, match="class 283 has no folder"):
        ImageFolder(tmp_path, classes=[281, 283], preprocess=SMALL)


@pytest.mark.parametrize("layout, match", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("loose", "holds images but no class sub-folders"),
    ("empty-class", r"class folder '.*b' holds no images"),
])
def test_bad_folders_are_named(tmp_path, layout, match):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "loose":
        save_png(root / "x.png", np.zeros((2, 2, 3)))
    if layout == "empty-class":
        make_folder(root, ["a"])
        (root / "b").mkdir()
        (root / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(VelcroError, match=match):
        ImageFolder(root, preprocess=SMALL)


def test_subset_keeps_the_given_order_and_refuses_strangers(tmp_path):
    folder = ImageFolder(make_folder(tmp_path, ["0", "1"]), preprocess=SMALL)
    part = folder.subset([("1/1.png", 1), ("0/0.png", 0)])
    assert part.samples == [("1/1.png", 1), ("0/0.png", 0)] and len(folder) == 4
    with pytest.raises(VelcroError, match="'0/9.png'"):
        folder.subset([("0/9.png", 0)])
    with pytest.raises(VelcroError, match="'0/0.png' \\(class 1\\)"):
        folder.subset([("0/0.png", 1)])


# ---- loading with unreadable images ----------------------------------------------------

def test_loader_batches_in_order_and_skips_unreadable_images(tmp_path):
    make_folder(tmp_path, ["0", "1"], per_class=3)
    data = (tmp_path / "0" / "1.png").read_bytes()
    (tmp_path / "0" / "1.png").write_bytes(data[: len(data) // 2])  # truncated
    (tmp_path / "1" / "fake.jpg").write_text("not a jpeg")
    folder = ImageFolder(tmp_path, preprocess=SMALL)
    loader = ImageLoader(folder, batch_size=4)
    batches = list(loader)
    labels = torch.cat([y for _, y in batches]).tolist()
    assert labels == [0, 0, 1, 1, 1] and sum(x.shape[0] for x, _ in batches) == 5
    assert sorted(loader.skipped) == ["0/1.png", "1/fake.jpg"]
    assert "truncated" in loader.skipped["0/1.png"]
    # the images that were read are exactly the files, preprocessed
    first = np.asarray(Image.open(tmp_path / "0" / "0.png")) / 255
    first = (first - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert torch.allclose(batches[0][0][0].double(), torch.tensor(first).permute(2, 0, 1),
                          atol=1e-6)
    assert [row["path"] for row in loader.skipped_list()] == ["0/1.png", "1/fake.jpg"]


def test_loader_fails_only_when_nothing_is_readable(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"\x89PNG broken")
    loader = ImageLoader(ImageFolder(tmp_path, preprocess=SMALL), batch_size=2)
    with pytest.raises(VelcroError, match=r"none of the 2 images.*'a/x.png'"):
        list(loader)
