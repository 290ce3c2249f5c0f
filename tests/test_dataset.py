"""Annotation reader, image decoding and the splits: real annotation files, stand-in images, every bad-input error."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import (AnnotationDataset, BadImageError, DatasetError, EpochSampler, load_dataset, load_image,
                     original_name, read_annotations, resolve_data_root)


def _stand_in_images(root, names, size=(12, 8)):
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", size, (120, 30, 200)).save(root / "images" / name)


@pytest.mark.parametrize("dataset", ["Corel-5k", "ESP-Game", "IAPR-TC-12"])
def test_real_annotation_files_parse_with_stand_in_images(shared_datasets, tmp_path, dataset):
    source = shared_datasets / dataset
    root = tmp_path / dataset
    root.mkdir()
    for f in ("train.json", "test.json"):
        (root / f).symlink_to(source / f)
    train_samples, vocabulary = read_annotations(source / "train.json")
    test_samples, _ = read_annotations(source / "test.json")
    _stand_in_images(root, [s["image_name"] for s in train_samples + test_samples])
    data = load_dataset(root, val_size=500, seed=0)
    assert data.vocabulary == vocabulary
    assert len(data.train) + len(data.val) == len(train_samples) and len(data.val) == 500
    assert len(data.test) == len(test_samples)
    assert not set(data.train.image_names) & set(data.val.image_names)
    # Multi-hot targets in vocabulary order, one 1 per listed label.
    first = data.test.targets[0]
    assert first.dtype == torch.float32 and first.sum() == len(test_samples[0]["image_labels"])
    assert {vocabulary[j] for j in first.nonzero().flatten()} == set(test_samples[0]["image_labels"])
    if dataset == "Corel-5k":
        assert len(vocabulary) == 260 and len(data.test) == 499


def test_corel_augmentation_adds_gan_copies_but_not_of_validation_images(shared_datasets, tmp_path):
    source = shared_datasets / "Corel-5k"
    root = tmp_path / "corel"
    root.mkdir()
    for f in ("train.json", "test.json", "train_aug.json"):
        (root / f).symlink_to(source / f)
    names = [s["image_name"] for f in ("train.json", "test.json", "train_aug.json")
             for s in read_annotations(source / f, require_labels=False)[0]]
    _stand_in_images(root, names)
    plain = load_dataset(root, val_size=500)
    augmented = load_dataset(root, augmentation=True, val_size=500)
    assert plain.val.image_names == augmented.val.image_names
    # 3 copies for each of the 4,000 remaining training images; none of the 500 validation images' copies.
    assert len(augmented.train) == len(plain.train) + 3 * len(plain.train)
    val = set(plain.val.image_names)
    assert not any(original_name(n) in val for n in augmented.train.image_names)
    # Under the study's protocol there is no validation split, so every copy is used.
    assert len(load_dataset(root, augmentation=True, select_on_test=True).train) == 4 * 4500


@pytest.mark.parametrize("name, original", [("1000_aug.jpeg", "1000.jpeg"), ("1000_aug_hor_flip.jpeg", "1000.jpeg"),
                                            ("1000_aug_rot_90.jpeg", "1000.jpeg"), ("1000.jpeg", "1000.jpeg"),
                                            ("a_aug_b.jpg", "a_aug_b.jpg")])
def test_original_name(name, original):
    assert original_name(name) == original


def _one_pixel_image(mode):
    """A 1 x 2 image of `mode` and the RGB each pixel must become, computed by hand."""
    if mode == "L":
        return Image.fromarray(np.array([[7, 200]], dtype=np.uint8), mode="L"), [[7, 7, 7], [200, 200, 200]]
    if mode == "I;16":  # 16-bit grey: v / 257 rounded (65535 -> 255, 2570 -> 10, 30000 -> 116.7 -> 117)
        return Image.fromarray(np.array([[2570, 30000]], dtype=np.uint16)), [[10, 10, 10], [117, 117, 117]]
    if mode == "CMYK":  # each channel (255 - c) (255 - k) / 255, rounded: (245 * 215, 235 * 215, 225 * 215) / 255
        image = Image.new("CMYK", (2, 1), (10, 20, 30, 40))
        return image, [[207, 198, 190]] * 2
    if mode == "P":  # palette index -> its colour
        image = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
        image.putpalette([12, 34, 56, 78, 90, 123] + [0] * 762)
        return image, [[12, 34, 56], [78, 90, 123]]
    if mode == "RGBA":  # alpha is dropped, not composited
        return Image.fromarray(np.array([[[1, 2, 3, 0], [250, 251, 252, 255]]], dtype=np.uint8), mode="RGBA"), \
            [[1, 2, 3], [250, 251, 252]]
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16"])
def test_images_of_any_mode_give_the_right_rgb_pixels(tmp_path, mode):
    image, expected = _one_pixel_image(mode)
    path = tmp_path / f"x.{'tiff' if mode == 'CMYK' else 'png'}"
    image.save(path)
    # Nearest-neighbour-sized: decode at the image's own width (2) so no interpolation mixes the two pixels.
    decoded = load_image(path, 2)  # (3, 2, 2), the 1 x 2 image stretched to 2 rows
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 2, 2)
    assert decoded[:, 0, :].T.tolist() == expected and decoded[:, 1, :].T.tolist() == expected


def test_load_image_resizes_like_pil(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "x.png")
    expected = np.array(Image.fromarray(array).resize((8, 8), Image.BILINEAR))
    torch.testing.assert_close(load_image(tmp_path / "x.png", 8), torch.from_numpy(expected).permute(2, 0, 1))


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(BadImageError, match="broken.jpeg.*--skip-bad-images"):
        load_image(bad, 8)


def test_dataset_skips_corrupt_images_when_asked(tiny_dataset):
    data = load_dataset(tiny_dataset, val_size=4)
    data.train.paths[0].write_bytes(b"garbage")
    with pytest.raises(BadImageError):
        AnnotationDataset(data.train, 16)[0]
    image, target, index, ok = AnnotationDataset(data.train, 16, skip_bad_images=True)[0]
    assert not ok and index == 0 and image.shape == (3, 16, 16)


# --- Bad input: one clear paragraph each -------------------------------------------------------------------------

def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*--data demo"):
        resolve_data_root(str(tmp_path / "nowhere"))


def test_missing_json(tiny_dataset):
    (tiny_dataset / "test.json").unlink()
    with pytest.raises(DatasetError, match="test.json' is missing"):
        load_dataset(tiny_dataset, val_size=4)


def test_malformed_json_says_where(tiny_dataset):
    (tiny_dataset / "train.json").write_text('{"samples": [\n  {"image_name": "1.jpeg",, }]}')
    with pytest.raises(DatasetError, match=r"train.json' is not valid JSON: .* line 2, column 27"):
        load_dataset(tiny_dataset, val_size=4)


def test_wrong_structure(tiny_dataset):
    (tiny_dataset / "train.json").write_text(json.dumps({"samples": [{"image_name": 3}], "labels": ["a"]}))
    with pytest.raises(DatasetError, match="sample 0"):
        load_dataset(tiny_dataset, val_size=4)
    (tiny_dataset / "train.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match='no "samples" list'):
        load_dataset(tiny_dataset, val_size=4)


def test_absent_images_counted_with_first_names(tiny_dataset):
    for name in ("0.jpeg", "1.jpeg", "2.jpeg"):
        (tiny_dataset / "images" / name).unlink()
    with pytest.raises(DatasetError, match=r"3 of 24 images .*0\.jpeg, 1\.jpeg, 2\.jpeg"):
        load_dataset(tiny_dataset, val_size=4)
    data = load_dataset(tiny_dataset, val_size=4, skip_missing=True)
    assert len(data.train) + len(data.val) == 21 and data.train.skipped == ["0.jpeg", "1.jpeg", "2.jpeg"]


def test_labels_not_in_vocabulary_are_listed(tiny_dataset):
    data = json.loads((tiny_dataset / "test.json").read_text())
    data["samples"][0]["image_labels"] += ["unicorn", "dragon"]
    (tiny_dataset / "test.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="2 label.*dragon, unicorn"):
        load_dataset(tiny_dataset, val_size=4)


def test_train_and_test_vocabularies_must_agree(tiny_dataset):
    data = json.loads((tiny_dataset / "test.json").read_text())
    data["labels"] = data["labels"][::-1]
    (tiny_dataset / "test.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="differs from train.json's.*different order"):
        load_dataset(tiny_dataset, val_size=4)


def test_images_also_found_in_aug_images(tiny_dataset):
    (tiny_dataset / "aug-images").mkdir()
    shutil.move(tiny_dataset / "images" / "5.jpeg", tiny_dataset / "aug-images" / "5.jpeg")
    data = load_dataset(tiny_dataset, val_size=4)
    paths = {n: p for n, p in zip(data.train.image_names + data.val.image_names, data.train.paths + data.val.paths)}
    assert paths["5.jpeg"].parent.name == "aug-images"


def test_validation_split_is_seeded(tiny_dataset):
    a, b, c = (load_dataset(tiny_dataset, val_size=5, seed=s) for s in (0, 0, 1))
    assert a.val.image_names == b.val.image_names != c.val.image_names
    with pytest.raises(DatasetError, match="--val-size"):
        load_dataset(tiny_dataset, val_size=24)


def test_epoch_sampler_orders_depend_on_seed_and_epoch_and_resume_mid_epoch():
    sampler = EpochSampler(10, shuffle=True, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(full) == list(range(10))
    sampler.set_epoch(2, skip=4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_epoch(3)
    assert list(sampler) != full
    # Sharded like DistributedSampler: padded to equal length, every index covered.
    shards = [EpochSampler(10, shuffle=False, num_replicas=3, rank=r) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert sorted(set(i for s in shards for i in s)) == list(range(10))


def test_shuffle_once_is_the_studys_scikit_learn_permutation(tiny_dataset):
    from sklearn.utils import shuffle

    plain = load_dataset(tiny_dataset, select_on_test=True)
    shuffled = load_dataset(tiny_dataset, select_on_test=True, shuffle_once=True)
    samples = json.loads((tiny_dataset / "train.json").read_text())["samples"]
    # The study: samples = shuffle(samples, random_state=0) on the list of sample dicts.
    assert shuffled.train.image_names == [s["image_name"] for s in shuffle(samples, random_state=0)]
    order = [plain.train.image_names.index(n) for n in shuffled.train.image_names]
    assert torch.equal(shuffled.train.targets, plain.train.targets[order])
    assert sorted(shuffled.train.image_names) == sorted(plain.train.image_names) != shuffled.train.image_names


def test_gan_copies_of_a_png_validation_image_stay_out_of_training(tiny_dataset):
    from DataAugmentation.files import output_names, write_train_aug

    samples = json.loads((tiny_dataset / "train.json").read_text())["samples"]
    vocabulary = json.loads((tiny_dataset / "train.json").read_text())["labels"]
    for s in samples[::2]:  # every other training image becomes a PNG
        png = s["image_name"].replace(".jpeg", ".png")
        Image.open(tiny_dataset / "images" / s["image_name"]).save(tiny_dataset / "images" / png)
        (tiny_dataset / "images" / s["image_name"]).unlink()
        s["image_name"] = png
    (tiny_dataset / "train.json").write_text(json.dumps({"samples": samples, "labels": vocabulary}))
    (tiny_dataset / "aug-images").mkdir()
    for s in samples:
        for out in output_names(s["image_name"]):
            Image.new("RGB", (24, 16)).save(tiny_dataset / "aug-images" / out)
    write_train_aug(tiny_dataset / "train_aug.json", samples, vocabulary, {s["image_name"] for s in samples})
    data = load_dataset(tiny_dataset, augmentation=True, val_size=6)
    copies = [n for n in data.train.image_names if "_aug" in n]
    sources = {src for src in data.train.sources if src is not None}
    assert sources == set(data.train.image_names) - set(copies)  # copies of the training images, and only those
    assert len(copies) == 3 * (len(samples) - 6)
    assert not sources & set(data.val.image_names) and any(n.endswith(".png") for n in data.val.image_names)
    assert data.train.generated.tolist() == ["_aug" in n for n in data.train.image_names]
