"""The registry's per-model preprocessing and default head sizes."""

import pytest

from velcro import models
from velcro.data import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from velcro.errors import VelcroError


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "mobilenet_v2",
                                  "googlenet"])
def test_torchvision_models_get_the_imagenet_transform(name):
    preprocess = models.preprocess_for(name)
    assert preprocess == Preprocess()
    assert (preprocess.resize, preprocess.crop, preprocess.interpolation) == (256, 224, "bilinear")
    assert (preprocess.mean, preprocess.std, preprocess.scale) == (IMAGENET_MEAN, IMAGENET_STD,
                                                                   255.0)


def test_cifar_and_lite0_preprocessing():
    for depth in (20, 32, 44, 56):
        cifar = models.preprocess_for(f"cifar_resnet{depth}")
        assert (cifar.resize, cifar.crop, cifar.scale, cifar.crop_fraction) == (None, 32, 255.0,
                                                                                 None)
        assert (cifar.mean, cifar.std) == (IMAGENET_MEAN, IMAGENET_STD)
    lite0 = models.preprocess_for("efficientnet_lite0")
    assert (lite0.resize, lite0.crop, lite0.crop_fraction) == (None, 224, 224 / 256)
    assert (lite0.interpolation, lite0.scale, lite0.mean, lite0.std) == (
        "bicubic", 1.0, (127.0,) * 3, (128.0,) * 3)


def test_default_head_sizes():
    assert models.create("cifar_resnet20").linear.out_features == 10
    assert models.create("cifar_resnet20", num_classes=100).linear.out_features == 100
    assert models.create("efficientnet_lite0")._fc.out_features == 1000
    assert models.create("resnet18").fc.out_features == 1000


def test_unknown_names_and_registration_with_preprocessing():
    with pytest.raises(VelcroError, match="unknown model 'cifar_resnet21'.*cifar_resnet20"):
        models.preprocess_for("cifar_resnet21")
    grey = Preprocess(resize=None, crop=28, mean=(0.5,), std=(0.5,), mode="L")

    @models.register("registry_test_grey", preprocess=grey, num_classes=7)
    def _builder(*, num_classes, weights=None):
        return models.resnet18(num_classes=num_classes, weights=weights)

    assert models.preprocess_for("registry_test_grey") is grey
    assert models.create("registry_test_grey").fc.out_features == 7
    with pytest.raises(VelcroError, match="must be a velcro.data.Preprocess"):
        models.register("registry_test_bad", preprocess={"resize": 256})
