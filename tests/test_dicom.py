"""dicom.py through data.load_image, on the DICOM files pydicom ships in its own package: the file's window applied
(checked against pydicom's own windowing), MONOCHROME1 inverted, a multi-frame file's middle frame or the one asked
for, a compressed file decoded where a decoder is installed and refused in one clear line where none is, a file known
by its DICM magic whatever its name, and pydicom missing named with its install line."""

import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

from data import ImageError, load_image
from dicom import INSTALL
from test_chat import ROOT, TOKENIZER, tiny_model

MR = get_testdata_file("MR_small.dcm")  # 64 x 64, 16-bit, Window Center 600 / Width 1600


def grey(image):
    return np.asarray(image.convert("L")).astype(int)


def test_the_files_window_is_applied_as_pydicom_applies_it():
    ds = pydicom.dcmread(MR)
    assert float(ds.WindowCenter) == 600 and float(ds.WindowWidth) == 1600
    # pydicom's windowing maps the window onto the stored range 0 .. 2^BitsStored - 1 (signed: shifted); scale that
    low, high = (0, 2**ds.BitsStored - 1) if ds.PixelRepresentation == 0 else (-2**(ds.BitsStored - 1),
                                                                               2**(ds.BitsStored - 1) - 1)
    reference = (apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) - low) / (high - low) * 255
    ours = grey(load_image(MR))
    assert np.abs(ours - reference).max() <= 1
    raw = ds.pixel_array.astype(float)  # without the window: its own min..max, which the window changes
    assert np.abs(ours - (raw - raw.min()) / (raw.max() - raw.min()) * 255).mean() > 10


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(MR)
    ds.PhotometricInterpretation = "MONOCHROME1"  # white is the lowest value, as in many X-rays
    ds.save_as(tmp_path / "mono1.dcm")
    assert np.abs(grey(load_image(str(tmp_path / "mono1.dcm"))) - (255 - grey(load_image(MR)))).max() <= 1


def test_a_multi_frame_file_gives_its_middle_frame_or_the_one_asked_for():
    dose = get_testdata_file("rtdose.dcm")  # 15 frames of 10 x 10
    assert int(pydicom.dcmread(dose, stop_before_pixels=True).NumberOfFrames) == 15

    def stretched(k):
        a = pixel_array(dose, index=k).astype(float)
        return np.round((a - a.min()) / (a.max() - a.min()) * 255)

    assert (grey(load_image(dose)) == stretched(7)).all()
    assert (grey(load_image(dose, frame=3)) == stretched(3)).all() and (stretched(3) != stretched(7)).any()
    with pytest.raises(ImageError, match=r"frame 15 asked for, but the file has 15 \(0 to 14\)"):
        load_image(dose, frame=15)


def test_compressed_files_decode_where_a_decoder_is_installed_and_are_refused_where_not():
    rle = get_testdata_file("MR_small_RLE.dcm")  # the same image as MR_small, RLE-compressed (pydicom decodes RLE)
    assert (grey(load_image(rle)) == grey(load_image(MR))).all()
    lossy = get_testdata_file("JPEG-lossy.dcm")  # 12-bit JPEG: Pillow cannot, pylibjpeg or GDCM could
    with pytest.raises(ImageError, match=r"JPEG-lossy.dcm: compressed as JPEG Extended .*no decoder for it is "
                                         r"installed \(pip install pylibjpeg"):
        load_image(lossy)


def test_colour_and_non_image_files():
    rgb = load_image(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    assert rgb.mode == "RGB" and rgb.size == (100, 100)
    with pytest.raises(ImageError, match="a DICOM file without an image"):
        load_image(get_testdata_file("rtplan.dcm"))


def test_a_dicom_file_is_known_by_its_magic_whatever_its_name(tmp_path):
    shutil.copy(MR, tmp_path / "scan")
    assert (grey(load_image(str(tmp_path / "scan"))) == grey(load_image(MR))).all()
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    with pytest.raises(ImageError, match="broken.dcm: "):
        load_image(str(tmp_path / "broken.dcm"))


def test_chat_py_reads_a_frame_and_names_pydicom_when_it_is_missing(tmp_path):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder, tokenizer=TOKENIZER)
    dose = get_testdata_file("rtdose.dcm")

    def run(*args, hide_pydicom=False):
        hide = "import sys; sys.modules['pydicom'] = None; " if hide_pydicom else ""
        code = hide + "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path('chat.py', run_name='__main__')"
        return subprocess.run([sys.executable, "-c", code, "chat.py", *args, "--model", str(folder), "--question",
                               "What is it?", "--max-new-tokens", "4"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)

    refused = run(dose, "--frame", "99")  # the flag reaches the reader (frames themselves are tested above)
    assert refused.returncode == 1 and refused.stderr.strip() == (f"error: {dose}: frame 99 asked for, but the file "
                                                                  f"has 15 (0 to 14)")
    missing = run(MR, hide_pydicom=True)
    assert missing.returncode == 1 and missing.stderr.strip() == f"error: {MR}: {INSTALL}"
    assert INSTALL == "reading DICOM files needs pydicom: pip install pydicom"
