"""Datasets, transforms, sampling and the embedded data sets."""

import struct
import types
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from kepler.data import (
    ImagePaths,
    ImageTransform,
    SamplePhotos,
    SeededSampler,
    build_dataset,
    collate,
    dataset_labels,
    first_items,
)
from kepler.data.sample import TRAIN_PHOTOS, VAL_PHOTOS, grid_offsets


def write_image(path, size=(40, 30), colour=(200, 10, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "images"
    write_image(root / "a.jpg")
    write_image(root / "sub" / "b.png", colour=(0, 255, 0))
    write_image(root / "sub" / "deeper" / "c.webp", colour=(0, 0, 255))
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_is_recursive_over_jpg_png_webp(image_tree):
    ds = ImagePaths.from_folder(image_tree, ImageTransform(16))
    assert [p.split("images/")[1] for p in ds.paths] == ["a.jpg", "sub/b.png", "sub/deeper/c.webp"]
    image, skipped = ds[1]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and skipped == ()
    # pure green in [-1, 1]
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))


def test_list_file_paths_relative_to_the_list(image_tree, tmp_path):
    listing = image_tree / "train.txt"
    listing.write_text("# training images\nsub/b.png\n\n" + str(image_tree / "a.jpg") + "\n")
    ds = build_dataset({"size": 16}, "train", spec=listing)
    assert len(ds) == 2 and ds.paths[0] == str(image_tree / "sub" / "b.png")


def test_corrupt_images_are_skipped_with_a_warning_and_counted(image_tree):
    bad = image_tree / "sub" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    truncated = image_tree / "trunc.jpg"
    data = (image_tree / "a.jpg").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    ds = ImagePaths.from_folder(image_tree, ImageTransform(16))
    order = [p.split("images/")[1] for p in ds.paths]
    assert order == ["a.jpg", "sub/b.png", "sub/broken.png", "sub/deeper/c.webp", "trunc.jpg"]
    with pytest.warns(UserWarning, match=f"skipping unreadable image {bad}"):
        image, skipped = ds[2]
    assert skipped == (str(bad),)
    # the next readable image (c.webp, blue) took its place
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]), atol=0.05, rtol=0)  # lossy webp
    with pytest.warns(UserWarning, match="trunc.jpg"):
        _, skipped = ds[4]
    assert skipped == (str(truncated),)
    with pytest.warns(UserWarning, match="broken.png"):
        images, skipped = collate([ds[0], ds[2]])
    assert images.shape == (2, 3, 16, 16) and skipped == [str(bad)]


def test_all_images_unreadable_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    (tmp_path / "y.jpg").write_bytes(b"")
    ds = ImagePaths.from_folder(tmp_path, ImageTransform(8))
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no readable image"):
        ds[0]
    # found when the data set is built, not later inside a DataLoader worker
    with pytest.raises(ValueError, match=f"no readable image in {tmp_path}: all 2 files failed to load "
                                         f"\\(first: {tmp_path / 'x.png'}: cannot identify image file"):
        build_dataset({"size": 8}, "train", spec=tmp_path)


def write_png16(path, array) -> None:
    """A 16-bit PNG (greyscale for (H, W), RGB for (H, W, 3) uint16 arrays), written by hand: PIL
    cannot write 16-bit RGB."""
    a = np.asarray(array, dtype=">u2")
    rows = b"".join(b"\x00" + a[y].tobytes() for y in range(a.shape[0]))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, 0 if a.ndim == 2 else 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_pngs_are_scaled_to_the_8_bit_range(tmp_path, channels):
    from kepler.cli.models import load_images

    ramp = np.linspace(0, 65535, 16 * 24).round().astype(np.uint16).reshape(16, 24)
    wide = ramp if channels == 1 else np.stack([ramp, ramp[::-1], 65535 - ramp], axis=-1)
    write_png16(tmp_path / "wide.png", wide)
    narrow = np.broadcast_to((wide / 257.0).round().astype(np.uint8)[..., None] if channels == 1
                             else (wide / 257.0).round().astype(np.uint8), (16, 24, 3))
    expected = torch.from_numpy(narrow.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    image, _ = build_dataset({"size": 16}, "val", spec=tmp_path)[0]
    centre = (24 - 16) // 2
    torch.testing.assert_close(image, expected[:, :, centre:centre + 16], atol=1 / 127.5, rtol=0)
    f8_model = types.SimpleNamespace(downsample_factor=8, inference_bytes=lambda height, width: 0)
    (_, whole), = load_images([tmp_path / "wide.png"], None, f8_model, budget=1)
    torch.testing.assert_close(whole[0], expected, atol=1 / 127.5, rtol=0)


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty dataset: no images \(.jpg, .jpeg, .png, .webp\) found under"):
        build_dataset({"size": 16}, "train", spec=tmp_path)
    empty_list = tmp_path / "list.txt"
    empty_list.write_text("# nothing\n")
    with pytest.raises(ValueError, match="empty dataset: list file .* names no images"):
        build_dataset({"size": 16}, "train", spec=empty_list)
    with pytest.raises(ValueError, match=r"data '.*missing' is not a data source: expected the embedded photos "
                                         r"'sample', the embedded faces 'faces', a folder of webdataset shards "
                                         r"\(kepler data shard\), a folder of images or a list file of image paths "
                                         r"\(no such file or folder\)"):
        build_dataset({"size": 16}, "train", spec=tmp_path / "missing")
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        build_dataset({"size": 16}, "test")


def test_transform_resizes_shorter_side_and_crops():
    gradient = np.tile(np.arange(100, dtype=np.uint8)[None, :, None], (50, 1, 3))  # 50 x 100, ramp in x
    image = Image.fromarray(gradient)
    centre = ImageTransform(20, resize=25, random_crop=False, flip=False)
    assert centre.resize_shorter_side(image).size == (50, 25)
    out = centre(image)
    assert out.shape == (3, 20, 20)
    # the centre crop of the ramp is symmetric around the middle value
    assert abs(out[0, 10].mean().item() - (49.5 / 127.5 - 1)) < 0.05
    random = ImageTransform(20, resize=25)
    a = random(image, np.random.default_rng([1, 2, 3]))
    b = random(image, np.random.default_rng([1, 2, 3]))
    torch.testing.assert_close(a, b)
    crops = {tuple(random(image, np.random.default_rng(s))[0, 0, :2].tolist()) for s in range(20)}
    assert len(crops) > 3  # crop position and flip vary with the seed
    with pytest.raises(ValueError, match=r"resize \(10\) must be >= size \(20\)"):
        ImageTransform(20, resize=10)


def test_sampler_positions_seeds_and_resume_offset():
    data = list(range(10))
    sampler = SeededSampler(data, seed=3)
    sampler.set_epoch(1)
    full = list(sampler)
    assert sorted(i for i, _ in full) == data
    assert full[4][1] == (3, 1, 0, 4)
    sampler.set_epoch(1, start=4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    shards = [list(SeededSampler(data, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert sorted(i for s in shards for i, _ in s) == data


def test_sample_validation_photos_are_held_out_of_training():
    assert not set(TRAIN_PHOTOS) & set(VAL_PHOTOS)
    # the stereo pair shows the same scene: both views must be on the same side
    assert {"motorcycle_left", "motorcycle_right"} <= set(TRAIN_PHOTOS)
    train = SamplePhotos("train", 16, 32, samples_per_epoch=8)
    val = SamplePhotos("val", 16, 32)
    train_pixels = {p.tobytes() for p in train.photos}
    assert not any(p.tobytes() in train_pixels for p in val.photos)
    assert len(val) == sum(len(grid_offsets(p.size[0], 16)) * len(grid_offsets(p.size[1], 16)) for p in val.photos)
    # validation crops are fixed; training crops depend on the per-sample seed
    torch.testing.assert_close(val[0][0], val[0][0])
    assert not torch.equal(train[(0, (0, 0, 0, 0))][0], train[(0, (0, 1, 0, 0))][0])
    assert train[(5, (1, 2, 3, 4))][0].shape == (3, 16, 16)


def test_grid_offsets_cover_both_ends():
    assert grid_offsets(100, 40) == [0, 30, 60]
    assert grid_offsets(40, 40) == [0]
    assert grid_offsets(50, 40) == [0, 10]


def test_faces_split():
    train = build_dataset({"size": 16}, "train", spec="faces")
    val = build_dataset({"size": 16}, "val", spec="faces")
    assert len(train) == 180 and len(val) == 20
    image, _ = val[0]
    assert image.shape == (3, 16, 16)
    # greyscale replicated to RGB
    torch.testing.assert_close(image[0], image[1])


def test_faces_are_labelled_face_then_non_face_and_other_sets_are_not(image_tree):
    train, val = build_dataset({"size": 16}, "train", spec="faces"), build_dataset({"size": 16}, "val", spec="faces")
    assert dataset_labels(train)[0] == 2 and dataset_labels(train)[1].tolist() == [1] * 90 + [0] * 90
    assert dataset_labels(val)[1].tolist() == [1] * 10 + [0] * 10  # patches 9, 19, ..., 199
    assert dataset_labels(first_items(val, 12))[1].tolist() == [1] * 10 + [0] * 2
    assert dataset_labels(build_dataset({"size": 16}, "val", spec=image_tree)) == (0, None)


def test_collate_stacks_tuples_item_by_item():
    samples = [((torch.full((2, 3), i), torch.tensor(i)), ()) for i in range(4)]
    (maps, labels), skipped = collate(samples)
    assert maps.shape == (4, 2, 3) and labels.tolist() == [0, 1, 2, 3] and skipped == []


def test_a_registered_source_is_built_from_the_data_section(monkeypatch):
    """A new source is one registration: build_dataset finds it by its spec, hands it the whole
    data section with every default filled in, and names it among the kinds when nothing matches."""
    from kepler.data import sources

    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))
    seen = {}

    @sources.register_source("noise", "random noise 'noise'")
    def build_noise(spec, split, data):
        seen.update(spec=spec, split=split, data=data)
        return [torch.zeros(3, data["size"], data["size"])] * data["samples_per_epoch"]

    dataset = build_dataset({"train": "noise", "size": 8, "samples_per_epoch": 3}, "train")
    assert len(dataset) == 3 and dataset[0].shape == (3, 8, 8)
    assert seen["spec"] == "noise" and seen["split"] == "train"
    assert seen["data"]["flip"] is True and seen["data"]["val"] == "sample"  # DataSection's defaults
    with pytest.raises(ValueError, match=r"'nothing' is not a data source: .* or random noise 'noise' \(no such"):
        build_dataset({"size": 8}, "val", spec="nothing")
