"""The model registry (knl_train/models/registry.py): every network registered once, lookups with
suggestions, options passed through, and each registered model built."""

from __future__ import annotations

import pytest

from knl_train import models
from knl_train.errors import UserError

ALL = ["alexnet", "alexnet_bn", "resnet20", "resnet50", "resnet50_v1_5", "resnet50_v2", "small_cnn"]


def test_registry_lists_every_model():
    assert sorted(models.MODELS) == sorted(ALL)
    assert models.names() == tuple(sorted(ALL))
    with pytest.raises(ValueError, match="registered twice"):
        models.register("resnet20")(lambda num_classes, image_size: None)


def test_unknown_model_is_a_user_error_listing_names():
    with pytest.raises(UserError) as err:
        models.build("vgg16", num_classes=10, image_size=32)
    for name in ALL:
        assert name in str(err.value)
    with pytest.raises(UserError, match="unknown model 'resnet05' .did you mean resnet50"):
        models.build("resnet05", num_classes=10, image_size=32)


def test_kwargs_pass_through():
    m = models.build("resnet20", num_classes=10, image_size=32, blocks=5)
    assert m.name == "resnet32"
    with pytest.raises(TypeError):
        models.build("resnet20", num_classes=10, image_size=32, no_such_option=1)


@pytest.mark.parametrize("name", models.names())
def test_every_registered_model_builds_at_32px(name):
    m = models.build(name, num_classes=10, image_size=32)
    assert m.output_shape == (None, 10)
