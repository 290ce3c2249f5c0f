"""Decoded-image cache: identical tensors to the PIL path, keys that go stale, atomic builds, memmap round trip."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import image_cache
from dataset import AnnotationDataset, BadImageError, load_dataset, load_image, make_loader
from image_cache import CacheError, build_cache, cache_key, cache_nbytes, cache_path, resolve_cache_mode

SIZE = 32


@pytest.fixture
def splits(tiny_dataset):
    """The tiny dataset's splits, with two test images replaced by a greyscale PNG and a palette PNG."""
    data = load_dataset(tiny_dataset, val_size=4)
    rng = np.random.default_rng(1)
    grey = data.test.paths[0].with_suffix(".png")
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8), mode="L").save(grey)
    palette = data.test.paths[1].with_suffix(".png")
    Image.fromarray(rng.integers(0, 256, (25, 17, 3), dtype=np.uint8)).convert("P").save(palette)
    data.test.paths[0], data.test.paths[1] = grey, palette
    return data


def _pil_images(split, size=SIZE):
    return torch.stack([load_image(p, size) for p in split.paths])  # (N, 3, S, S)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_memory_cache_equals_pil_path_exactly(splits, num_workers):
    cache = build_cache(splits.test, SIZE, "memory", num_workers=num_workers)
    assert isinstance(cache, np.ndarray) and cache.dtype == np.uint8 and cache.shape == (len(splits.test), 3, SIZE, SIZE)
    torch.testing.assert_close(torch.from_numpy(cache), _pil_images(splits.test), rtol=0, atol=0)


def test_dataset_items_and_batches_match_with_and_without_cache(splits):
    cache = build_cache(splits.train, SIZE, "memory")
    plain = AnnotationDataset(splits.train, SIZE)
    cached = AnnotationDataset(splits.train, SIZE, cache=cache)
    for i in (0, 5, len(plain) - 1):
        a, b = plain[i], cached[i]
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
        assert a[2:] == b[2:]
    loaders = [make_loader(d, 4, 0, shuffle=True, seed=3) for d in (plain, cached)]
    for batch_a, batch_b in zip(*loaders):
        for x, y in zip(batch_a, batch_b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_disk_cache_round_trips_as_memmap_and_is_reused(splits, tmp_path, monkeypatch):
    memory = build_cache(splits.test, SIZE, "memory")
    disk = build_cache(splits.test, SIZE, "disk", tmp_path / "cache")
    assert isinstance(disk, np.memmap) and disk.shape == memory.shape and disk.dtype == np.uint8
    np.testing.assert_array_equal(disk, memory)
    path = cache_path(tmp_path / "cache", splits.test, SIZE)
    assert path.is_file() and path.stat().st_size >= cache_nbytes(len(splits.test), SIZE)
    np.testing.assert_array_equal(np.load(path), memory)  # a plain .npy, readable without this module
    # Writes through the copy-on-write map stay in this process; the file keeps the decoded pixels.
    disk[0] = 0
    np.testing.assert_array_equal(np.load(path)[0], memory[0])

    def no_decoding(*args, **kwargs):
        raise AssertionError("a finished cache file must be reused, not decoded again")

    monkeypatch.setattr(image_cache, "_decode_into", no_decoding)
    again = build_cache(splits.test, SIZE, "disk", tmp_path / "cache")
    np.testing.assert_array_equal(again, memory)
    # Forked DataLoader workers read the same map.
    loader = make_loader(AnnotationDataset(splits.test, SIZE, cache=again), 4, 2, shuffle=False)
    torch.testing.assert_close(torch.cat([b[0] for b in loader]), torch.from_numpy(memory), rtol=0, atol=0)


def test_key_goes_stale_when_a_file_or_the_size_changes(splits, tmp_path):
    split = splits.test
    key = cache_key(split, SIZE)
    assert key == cache_key(split, SIZE) and key.startswith(f"test-{SIZE}px-")
    assert cache_key(split, SIZE * 2) != key
    assert cache_key(split.subset(range(1, len(split)), "test"), SIZE) != key
    target = split.paths[3]
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, new mtime
    assert cache_key(split, SIZE) != key
    key_after_touch = cache_key(split, SIZE)
    # New content of another size (mtime restored, so only the size tells).
    before = target.stat()
    Image.new("RGB", (40, 30), (250, 0, 0)).save(target, quality=50)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size != before.st_size
    assert cache_key(split, SIZE) not in (key, key_after_touch)


def test_key_is_stable_across_processes_and_follows_the_decoder(splits, monkeypatch):
    key = cache_key(splits.test, SIZE)
    code = ("import sys, pickle; from image_cache import cache_key; "
            "print(cache_key(pickle.loads(sys.stdin.buffer.read()), %d))" % SIZE)
    other = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(splits.test), capture_output=True,
                           check=True, cwd=Path(image_cache.__file__).parent)
    assert other.stdout.decode().strip() == key
    # An edited decoder (here: nearest-neighbour resizing) gives another key.
    monkeypatch.setattr(image_cache, "load_image", lambda path, size: Image.open(path).resize((size, size), 0))
    assert cache_key(splits.test, SIZE) != key


def test_stale_disk_cache_is_not_used_after_a_file_changes(splits, tmp_path):
    split, cache_dir = splits.test, tmp_path / "cache"
    old = np.array(build_cache(split, SIZE, "disk", cache_dir))
    target = split.paths[2]
    Image.new("RGB", (48, 32), (0, 255, 0)).save(target, quality=95)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    new = build_cache(split, SIZE, "disk", cache_dir)
    torch.testing.assert_close(torch.from_numpy(np.array(new)), _pil_images(split), rtol=0, atol=0)
    assert not np.array_equal(new[2], old[2])
    assert len(list(cache_dir.glob("*.npy"))) == 2  # the old file is left, never opened under the new key


def test_interrupted_build_is_never_used(splits, tmp_path, monkeypatch):
    split, cache_dir = splits.test, tmp_path / "cache"
    path = cache_path(cache_dir, split, SIZE)
    # A leftover temporary file of an earlier, killed build (half-written garbage): ignored.
    cache_dir.mkdir()
    leftover = cache_dir / f".{path.name}.killed.tmp"
    np.lib.format.open_memmap(leftover, mode="w+", dtype=np.uint8, shape=(len(split), 3, SIZE, SIZE)).flush()

    real_load = image_cache.AnnotationDataset.__getitem__
    calls = {"n": 0}

    def interrupted(self, index):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real_load(self, index)

    monkeypatch.setattr(image_cache.AnnotationDataset, "__getitem__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(split, SIZE, "disk", cache_dir)
    assert not path.exists()
    assert sorted(p.name for p in cache_dir.iterdir()) == [leftover.name]  # our own temporary file is removed
    monkeypatch.setattr(image_cache.AnnotationDataset, "__getitem__", real_load)
    cache = build_cache(split, SIZE, "disk", cache_dir)
    torch.testing.assert_close(torch.from_numpy(np.array(cache)), _pil_images(split), rtol=0, atol=0)


def test_killed_build_leaves_no_cache_file(splits, tmp_path):
    """A process killed mid-build (no exception handler runs) leaves only its temporary file, which is never read."""
    split, cache_dir = splits.test, tmp_path / "cache"
    code = ("import os, pickle, sys; import dataset, image_cache; split = pickle.loads(sys.stdin.buffer.read()); "
            "real = dataset.AnnotationDataset.__getitem__; "
            "dataset.AnnotationDataset.__getitem__ = lambda self, i: os._exit(9) if i == 3 else real(self, i); "
            "image_cache.build_cache(split, %d, 'disk', sys.argv[1])" % SIZE)
    killed = subprocess.run([sys.executable, "-c", code, str(cache_dir)], input=pickle.dumps(split),
                            cwd=Path(image_cache.__file__).parent)
    assert killed.returncode == 9
    path = cache_path(cache_dir, split, SIZE)
    assert not path.exists() and len(list(cache_dir.glob(f".{path.name}.*.tmp"))) == 1
    cache = build_cache(split, SIZE, "disk", cache_dir)
    torch.testing.assert_close(torch.from_numpy(np.array(cache)), _pil_images(split), rtol=0, atol=0)


def test_auto_mode_picks_memory_below_the_limit_and_disk_above(splits, tmp_path):
    n = len(splits.test)
    limit = cache_nbytes(n, SIZE)
    assert resolve_cache_mode("auto", n, SIZE, limit) == "memory"
    assert resolve_cache_mode("auto", n, SIZE, limit - 1) == "disk"
    in_memory = build_cache(splits.test, SIZE, "auto", tmp_path / "cache", memory_limit_bytes=limit)
    on_disk = build_cache(splits.test, SIZE, "auto", tmp_path / "cache", memory_limit_bytes=limit - 1)
    assert not isinstance(in_memory, np.memmap) and isinstance(on_disk, np.memmap)
    np.testing.assert_array_equal(in_memory, on_disk)
    assert build_cache(splits.test, SIZE, "none") is None


def test_bad_requests_raise_one_clear_error(splits, tmp_path):
    with pytest.raises(CacheError, match="Unknown cache mode 'fast'"):
        build_cache(splits.test, SIZE, "fast")
    with pytest.raises(CacheError, match="needs a cache folder"):
        build_cache(splits.test, SIZE, "disk", None)
    with pytest.raises(CacheError, match="image_size must be a positive integer"):
        build_cache(splits.test, 0, "memory")
    with pytest.raises(CacheError, match="num_workers must be an integer >= 0"):
        build_cache(splits.test, SIZE, "memory", num_workers=-1)
    path = cache_path(tmp_path, splits.test, SIZE)
    np.save(path, np.zeros((1, 3, SIZE, SIZE), dtype=np.uint8))  # a damaged file under the right key
    with pytest.raises(CacheError, match="damaged: delete it"):
        build_cache(splits.test, SIZE, "disk", tmp_path)


def test_unreadable_images_are_named(splits):
    splits.test.paths[4].write_bytes(b"not a jpeg")
    with pytest.raises(BadImageError, match=rf"1 of {len(splits.test)} images of split 'test' cannot be read"):
        build_cache(splits.test, SIZE, "memory")



def test_channel_statistics_equal_numpy_over_every_pixel_and_are_cached(splits, tmp_path):
    from image_cache import channel_statistics

    train = splits.train
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
                       for p in train.paths]).astype(np.float64) / 255  # (N, S, S, 3)
    mean, std = channel_statistics(train, SIZE, cache_dir=tmp_path)
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(std, pixels.std(axis=(0, 1, 2)), atol=1e-6)
    cached = build_cache(train, SIZE, "memory")
    assert channel_statistics(train, SIZE, cached) == (mean, std)  # from the decoded cache: the same numbers
    (stats_file,) = tmp_path.glob("stats-*.json")
    stats_file.write_text('{"mean": [1, 2, 3], "std": [4, 5, 6]}')
    assert channel_statistics(train, SIZE, cache_dir=tmp_path) == ([1, 2, 3], [4, 5, 6])  # reused, not recomputed
