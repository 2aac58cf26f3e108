"""Image sets: metadata columns stay aligned with the images through remap, preprocessing and subsets."""
import pytest
import torch

from workers.engine.data import ImageFiles, TensorImages
from workers.engine.errors import EngineError

CLASSES = ["melanoma", "nevus"]
RULER = ["1", "0", "0", "1", "1"]
SITE = ["back", "arm", "leg", "arm", "back"]


@pytest.fixture
def tensors():
    x = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2).clone()  # image i is all i
    return TensorImages(x, [0, 1, 1, 0, 1], CLASSES, metadata={"a ruler": RULER, "site": SITE})


def test_an_image_set_without_metadata_has_an_empty_mapping():
    images = TensorImages(torch.zeros(2, 3, 2, 2), [0, 1], CLASSES)
    assert dict(images.metadata) == {}
    assert dict(images.subset([1]).metadata) == {}


def test_remap_keeps_the_metadata_with_its_images(tensors):
    remapped = tensors.remap(["nevus", "melanoma"])
    assert remapped.labels.tolist() == [1, 0, 0, 1, 0]
    assert remapped.metadata == {"a ruler": RULER, "site": SITE}


def test_a_subset_reorders_labels_ids_pixels_and_metadata_alike(tensors):
    sub = tensors.remap(["nevus", "melanoma"]).subset([4, 0, 2])
    assert [int(sub[i][0][0, 0, 0]) for i in range(3)] == [4, 0, 2]
    assert sub.labels.tolist() == [0, 1, 0]
    assert sub.ids == ["image-000004", "image-000000", "image-000002"]
    assert sub.metadata == {"a ruler": ["1", "1", "0"], "site": ["back", "back", "leg"]}
    assert tensors.metadata["a ruler"] == RULER  # the original is untouched


def test_image_files_keep_metadata_through_preprocessing_and_subsets(tmp_path):
    from PIL import Image

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(paths[-1])
    files = ImageFiles(paths, [0, 1, 1, 0, 1], CLASSES, metadata={"a ruler": [1, 0, 0, 1, 1]})
    ready = files.remap(["nevus", "melanoma"]).with_preprocess(lambda img: torch.tensor(img.getpixel((0, 0))))
    assert ready.metadata == {"a ruler": RULER}  # values are strings, as in labels.csv
    sub = ready.subset([3, 1])
    assert [int(sub[i][0][0]) for i in range(2)] == [120, 40]
    assert sub.ids == ["3.png", "1.png"] and sub.metadata == {"a ruler": ["1", "0"]}


def test_a_metadata_column_of_the_wrong_length_is_refused():
    with pytest.raises(EngineError, match="metadata column 'site' has 2 values for 3 images"):
        TensorImages(torch.zeros(3, 3, 2, 2), [0, 1, 0], CLASSES, metadata={"site": ["a", "b"]})
