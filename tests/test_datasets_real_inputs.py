"""Datasets as people have them (kohya folders, phone photos, 16-bit PNGs, odd captions), each kind as a small
generated fixture: read right, or refused with a message that names the file and the fix."""
import codecs
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dopsd_core import data


@pytest.fixture(scope="module")
def N(pack):
    from comfyui_dopsd import nodes
    from comfyui_dopsd.nodes import dataset_nodes, paths  # noqa: F401
    return nodes


@pytest.fixture()
def input_dir(tmp_path):
    import folder_paths
    old_in, old_out = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    (tmp_path / "input").mkdir()
    (tmp_path / "output").mkdir()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    folder_paths.set_output_directory(str(tmp_path / "output"))
    yield tmp_path / "input"
    folder_paths.set_input_directory(old_in)
    folder_paths.set_output_directory(old_out)


def _halves(size=(40, 20), left=(255, 0, 0), right=(0, 0, 255)):
    im = Image.new("RGB", size, right)
    im.paste(Image.new("RGB", (size[0] // 2, size[1]), left), (0, 0))
    return im


def _pair(folder, name, caption="a [trigger] thing", image=None):
    folder.mkdir(parents=True, exist_ok=True)
    (image or Image.new("RGB", (32, 32), (90, 120, 200))).save(folder / name)
    (folder / (os.path.splitext(name)[0] + ".txt")).write_text(caption, encoding="utf-8")


# -- orientation, bit depth, transparency ----------------------------------------------------------------

def test_exif_orientation_turns_a_phone_portrait_upright(tmp_path, N, input_dir):
    """A landscape sensor image tagged 'rotate 90° clockwise' (EXIF orientation 6) trains as a portrait, as
    ComfyUI's LoadImage shows it: left half (red) on top."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _halves().save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    im = data.open_image(str(tmp_path / "phone.jpg"))
    assert im.size == (20, 40)
    a = np.asarray(im).astype(int)
    assert a[5, 10, 0] > 200 and a[5, 10, 2] < 60      # top: red
    assert a[35, 10, 2] > 200 and a[35, 10, 0] < 60    # bottom: blue
    assert data.image_size(str(tmp_path / "phone.jpg")) == (20, 40)
    # the folder node buckets it as a portrait
    d = input_dir / "phone"
    d.mkdir()
    _halves((128, 64)).save(d / "p.jpg", exif=exif.tobytes())
    (d / "p.txt").write_text("a portrait")
    item = N.dataset_nodes.DOPSDDatasetFromFolder.execute("phone", "", 64)[0][0]
    assert item["image"].shape[1] > item["image"].shape[2]


def test_16bit_greyscale_png_is_scaled_not_clamped(tmp_path):
    ramp = np.linspace(0, 65535, 64).astype(np.uint16)[None].repeat(8, 0)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode in ("I;16", "I")  # a real 16-bit file
    a = np.asarray(data.open_image(str(tmp_path / "g16.png")))[..., 0].astype(int)
    np.testing.assert_allclose(a[0], np.round(ramp[0] / 257.0), atol=1)
    assert a[0, 0] == 0 and 120 <= a[0, 32] <= 135 and a[0, -1] == 255
    # a 32-bit integer greyscale file ("I", e.g. from older Pillow or a TIFF) holding 16-bit values: same scale
    Image.fromarray(ramp.astype(np.int32), "I").save(tmp_path / "g32.tif")
    assert abs(int(np.asarray(data.open_image(str(tmp_path / "g32.tif")))[0, 32, 0]) - round(ramp[0, 32] / 257)) <= 1


def test_transparency_is_white_through_folder_and_graph(N, input_dir):
    """One rule: a transparent pixel (stored as black, as most editors do) trains as white, whether the file
    comes through the folder node or through LoadImage -> Dataset (images + captions) with its MASK."""
    import nodes as comfy_nodes
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (32, 64), (200, 30, 30, 255)), (0, 0))
    d = input_dir / "alpha"
    d.mkdir()
    rgba.save(d / "cut.png")
    (d / "cut.txt").write_text("a cutout")
    rgba.save(input_dir / "cut.png")
    folder_item = N.dataset_nodes.DOPSDDatasetFromFolder.execute("alpha", "", 64)[0][0]
    image, mask = comfy_nodes.LoadImage().load_image("cut.png")
    assert float(image[0, 10, 50].max()) == 0.0  # LoadImage leaves the transparent half black
    graph_item = N.dataset_nodes.DOPSDDatasetFromImages.execute([image], ["a cutout"], [""], [64], [mask])[0][0]
    for item in (folder_item, graph_item):
        right = item["image"][0, :, 40:]
        assert float(right.min()) > 0.97, "transparent half is white"
        assert float(item["image"][0, 32, 5, 0]) > 0.7 and float(item["image"][0, 32, 5, 1]) < 0.2
    torch.testing.assert_close(folder_item["image"], graph_item["image"], atol=2 / 255, rtol=0)
    # an RGBA IMAGE tensor (alpha as 4th channel) follows the same rule
    four = torch.cat([image, 1.0 - mask[..., None]], dim=-1)
    four_item = N.dataset_nodes.DOPSDDatasetFromImages.execute(four, "a cutout", "", 64)[0][0]
    torch.testing.assert_close(four_item["image"], graph_item["image"])


# -- captions -------------------------------------------------------------------------------------------

def test_caption_encodings(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes(codecs.BOM_UTF8 + "a café".encode())
    assert data.read_caption(str(p)) == "a café"
    p.write_text("a café in Köln", encoding="utf-16")  # Notepad's "Unicode": UTF-16 LE with BOM
    assert data.read_caption(str(p)) == "a café in Köln"
    p.write_bytes("a café".encode("cp1252"))
    with pytest.raises(ValueError, match=r"caption .*c\.txt is not UTF-8.*save it as UTF-8"):
        data.read_caption(str(p))


def test_empty_and_missing_captions(tmp_path, caplog):
    _pair(tmp_path, "a.png", "")
    _pair(tmp_path, "b.png", "a dog")
    caplog.set_level(logging.WARNING)
    ex = data.load_folder(str(tmp_path))
    assert [e.caption for e in ex] == ["", "a dog"]
    assert any("caption of a.png is empty" in r.getMessage() for r in caplog.records)
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png")
    with pytest.raises(FileNotFoundError) as e:
        data.load_folder(str(tmp_path))
    assert "c.png has no caption: add c.txt beside it" in str(e.value)
    assert "default caption" not in str(e.value)  # the node has no such input


def test_jsonl_with_bom(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "d.jsonl").write_bytes(codecs.BOM_UTF8 + b'{"image": "x.png", "caption": "one"}\n')
    assert data.load_jsonl(str(tmp_path / "d.jsonl"))[0].caption == "one"


# -- what is read, what is skipped -----------------------------------------------------------------------

def test_kohya_repeat_folders(tmp_path, N, input_dir):
    d = input_dir / "kohya"
    _pair(d, "top.png")
    _pair(d / "10_mychar", "a.png")
    _pair(d / "10_mychar", "b.png")
    _pair(d / "3_style", "s.png")
    _pair(d / "misc", "m.png")
    scan = data.scan_folder(str(d))
    assert [(os.path.basename(e.image_path), e.repeats) for e in scan.examples] == \
        [("top.png", 1), ("a.png", 10), ("b.png", 10), ("s.png", 3)]
    assert any(name == "misc/" for name, _ in scan.skipped)
    assert len(data.expand_repeats(scan.examples)) == 1 + 20 + 3
    ds = N.dataset_nodes.DOPSDDatasetFromFolder.execute("kohya", "", 64)[0]
    assert len(ds) == 24 and len({id(item) for item in ds}) == 4  # repeats share one item (no copies)
    # nothing usable anywhere: the error says where images may be and what was not used
    only_misc = input_dir / "only_misc"
    _pair(only_misc / "misc", "m.png")
    with pytest.raises(ValueError) as e:
        data.scan_folder(str(only_misc))
    assert "<repeats>_<name>" in str(e.value) and "misc/" in str(e.value)


def test_every_pillow_extension_any_case_and_skips_reported_by_name(tmp_path, caplog):
    names = ["a.JFIF", "b.jpe", "c.TIF", "d.tiff", "e.gif", "f.PNG", "g.WebP", "h.bmp"]
    formats = {".jfif": "JPEG", ".jpe": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF", ".png": "PNG",
               ".webp": "WEBP", ".bmp": "BMP"}
    from PIL import features
    if features.check("avif"):
        names.append("i.avif")
        formats[".avif"] = "AVIF"
    for n in names:
        Image.new("RGB", (16, 16), (10, 200, 10)).save(tmp_path / n, formats[os.path.splitext(n)[1].lower()])
        (tmp_path / (os.path.splitext(n)[0] + ".txt")).write_text("x")
    (tmp_path / "notes.md").write_text("not data")
    (tmp_path / "lonely.txt").write_text("a caption without image")
    caplog.set_level(logging.WARNING)
    ex = data.load_folder(str(tmp_path))
    assert sorted(os.path.basename(e.image_path) for e in ex) == sorted(names)
    for e in ex:
        assert data.open_image(e.image_path).getpixel((8, 8))[1] > 150
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "skipped notes.md" in messages and "lonely.txt has no image" in messages


def test_huge_and_broken_images_name_the_file(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 > 2 * 1000: Pillow's bomb error
    for fn in (data.open_image, data.image_size):
        with pytest.raises(ValueError, match=r"huge\.png is too large to decode safely"):
            fn(str(tmp_path / "huge.png"))
    monkeypatch.undo()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "cut.png")
    raw = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*cut\.png"):
        data.open_image(str(tmp_path / "cut.png"))


def test_folder_fingerprint_changes_with_its_files(N, input_dir):
    d = input_dir / "fp"
    _pair(d, "a.png", "first")
    fp = N.dataset_nodes.DOPSDDatasetFromFolder.fingerprint_inputs(folder="fp", trigger="", resolution=64)
    assert fp == N.dataset_nodes.DOPSDDatasetFromFolder.fingerprint_inputs(folder="fp", trigger="", resolution=64)
    (d / "a.txt").write_text("edited")
    os.utime(d / "a.txt", ns=(1, 1))
    fp2 = N.dataset_nodes.DOPSDDatasetFromFolder.fingerprint_inputs(folder="fp", trigger="", resolution=64)
    assert fp2 != fp
    _pair(d / "2_more", "b.png")
    assert N.dataset_nodes.DOPSDDatasetFromFolder.fingerprint_inputs(folder="fp", trigger="", resolution=64) != fp2


def test_image_list_makes_one_dataset(N):
    """A LIST of IMAGEs of different sizes (what ComfyUI's dataset loaders give) is one dataset: the node
    takes lists, so the executor runs it once instead of once per image."""
    schema = N.dataset_nodes.DOPSDDatasetFromImages.define_schema()
    assert schema.is_input_list
    imgs = [torch.rand(1, 48, 32, 3), torch.rand(2, 32, 32, 3)]
    ds = N.dataset_nodes.DOPSDDatasetFromImages.execute(imgs, ["a\nb\nc"], ["sks"], [64])[0]
    assert [i["caption"] for i in ds] == ["sks a", "sks b", "sks c"]
    assert ds[0]["image"].shape[1] > ds[0]["image"].shape[2]  # the portrait kept its own bucket
    texts = ["first caption", "second\ncaption", "third"]  # a list of texts: one per image, kept whole
    ds = N.dataset_nodes.DOPSDDatasetFromImages.execute(imgs, texts, [""], [64])[0]
    assert [i["caption"] for i in ds] == ["first caption", "second caption", "third"]


# -- the folder under --listen -----------------------------------------------------------------------------

def test_symlinked_dataset_folder_rule(tmp_path, N, input_dir):
    import folder_paths
    _pair(tmp_path / "output" / "renders", "r.png")
    os.symlink(tmp_path / "output" / "renders", input_dir / "linked")
    assert N.dataset_nodes.DOPSDDatasetFromFolder.validate_inputs("linked") is True  # inside ComfyUI: followed
    assert len(N.dataset_nodes.DOPSDDatasetFromFolder.execute("linked", "", 64)[0]) == 1
    outside = tmp_path / "elsewhere"
    _pair(outside, "s.png")
    os.symlink(outside, input_dir / "escape")
    msg = N.dataset_nodes.DOPSDDatasetFromFolder.validate_inputs("escape")
    assert "link to a place outside" in msg and "'..'" not in msg
    os.symlink(tmp_path / "no_such_folder", input_dir / "dangling")
    assert N.dataset_nodes.DOPSDDatasetFromFolder.validate_inputs("dangling") == msg.replace("escape", "dangling")
    assert "escapes" in N.dataset_nodes.DOPSDDatasetFromFolder.validate_inputs("../elsewhere")
    assert folder_paths.get_input_directory() == str(input_dir)


def test_jsonl_rows_stay_inside_the_dataset_and_input(tmp_path, N, input_dir):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(secret)
    d = input_dir / "rows"
    d.mkdir()
    Image.new("RGB", (16, 16)).save(d / "ok.png")
    Image.new("RGB", (16, 16)).save(input_dir / "shared.png")
    (d / "good.jsonl").write_text('{"image": "ok.png", "caption": "a"}\n{"image": "shared.png", "caption": "b"}\n')
    assert len(N.dataset_nodes.DOPSDDatasetFromFolder.execute("rows/good.jsonl", "", 64)[0]) == 2
    os.symlink(secret, d / "link.png")
    rows = {"abs": str(secret), "rel": "../../secret.png", "link": "link.png",
            "missing_abs": str(tmp_path / "nope.png"), "missing_rel": "../../nope.png"}
    messages = set()
    for name, row in rows.items():
        (d / f"{name}.jsonl").write_text(f'{{"image": "{row}", "caption": "x"}}\n')
        with pytest.raises(ValueError, match="outside the dataset's folder and ComfyUI's input directory") as e:
            N.dataset_nodes.DOPSDDatasetFromFolder.execute(f"rows/{name}.jsonl", "", 64)
        messages.add(str(e.value).replace(f"{name}.jsonl", "X").replace(repr(row), "R"))
    assert len(messages) == 1  # the same words whether or not the outside file exists
