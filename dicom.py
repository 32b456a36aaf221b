"""DICOM files as clinicians have them: one frame of a .dcm file as the 8-bit image the rest of data.py reads.

A scanner's file holds more than pixels: stored values become physical ones (CT's Hounsfield units) through the
modality rescale, and the file names the window its image is meant to be seen in (Window Center / Width, or a VOI
LUT table): a CT's bone or lung window shows what the raw 12-bit range hides. MONOCHROME1 files store white as
0 (many X-rays), so they are inverted; a multi-frame file (a cine loop, a volume) gives one frame, the middle one
unless asked. The rules are DICOM PS3.3 C.11.1 (modality LUT), C.11.2 (VOI LUT, "LINEAR" windowing) and C.7.6.3.1.2
(photometric interpretation). pydicom reads the file; it is optional, imported only when a DICOM file arrives.
"""

import numpy as np
from PIL import Image

INSTALL = "reading DICOM files needs pydicom: pip install pydicom"


def is_dicom(path):
    """A DICOM Part 10 file: 128 bytes of preamble, then "DICM" (PS3.10 7.1), whatever its name."""
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def read_dicom(path, max_pixels, frame=None):
    """One frame of a DICOM file -> an 8-bit PIL image ("L" or "RGB"), windowed as the file says. frame: 0-based,
    default the middle one. Raises ValueError with a one-line reason (data.load_image adds the file's name)."""
    try:
        import pydicom
        from pydicom.pixels import pixel_array
    except ImportError:
        raise ValueError(INSTALL) from None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)  # the header: size and settings, no pixels yet
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise ValueError(f"not a readable DICOM file ({e})") from e
    if "Rows" not in ds or "Columns" not in ds:
        raise ValueError(f"a DICOM file without an image ({ds.get('Modality', 'no modality')}, "
                         f"{ds.get('SOPClassUID', 'unknown class')!s})")
    if ds.Rows * ds.Columns > max_pixels:
        raise ValueError(f"{ds.Columns}x{ds.Rows} pixels is over the limit of {max_pixels}; --max-image-pixels N "
                         f"raises it")
    frames = int(ds.get("NumberOfFrames") or 1)
    index = frames // 2 if frame is None else frame
    if not 0 <= index < frames:
        raise ValueError(f"frame {frame} asked for, but the file has {frames} (0 to {frames - 1})")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        arr = pixel_array(path, index=index if frames > 1 else None)  # decodes only that frame
    except (RuntimeError, NotImplementedError) as e:  # pydicom's words when no installed decoder takes the file
        name = getattr(syntax, "name", "this transfer syntax")
        raise ValueError(f"compressed as {name}, and no decoder for it is installed "
                         f"(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or python-gdcm): "
                         f"{str(e).splitlines()[-1].strip()}") from e
    except (ValueError, OSError, EOFError, AttributeError, KeyError) as e:
        raise ValueError(f"corrupt or truncated DICOM pixel data ({e})") from e
    return _to_8bit(arr, ds)


def _to_8bit(arr, ds):
    """Decoded pixels -> 8 bits as they are meant to be seen: colour as stored, greyscale through its window."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    colour = ds.get("PhotometricInterpretation", "MONOCHROME2")
    if colour == "PALETTE COLOR":  # indices into the file's own colour table (16-bit entries, or 8)
        rgb = apply_color_lut(arr, ds)
        return Image.fromarray((rgb / (255 if rgb.max() <= 255 else 65535) * 255).round().astype(np.uint8), "RGB")
    if arr.ndim == 3:  # RGB (pydicom turns YBR into RGB), maybe more than 8 bits a sample
        top = 2 ** int(ds.get("BitsStored", 8)) - 1
        return Image.fromarray((arr.astype(np.float64) * (255 / top)).round().astype(np.uint8), "RGB")
    values = apply_modality_lut(arr, ds).astype(np.float64)  # stored values -> physical ones (slope, intercept)
    if "WindowCenter" in ds and "WindowWidth" in ds and ds.get("VOILUTFunction", "LINEAR") == "LINEAR":
        centre, width = (float(v[0] if v.VM > 1 else v.value) for v in (ds["WindowCenter"], ds["WindowWidth"]))
        # PS3.3 C.11.2.1.2.1: the window's first choice; below it black, above it white, linear between
        y = np.clip((values - (centre - 0.5)) / max(width - 1, 1) + 0.5, 0, 1)
    else:
        if "VOILUTSequence" in ds or "WindowCenter" in ds:  # a LUT table, or a SIGMOID window: pydicom's
            values = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float64)
        lo, hi = values.min(), values.max()  # then, or with no window at all, the image's own range
        y = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if colour == "MONOCHROME1":  # the lowest value is white
        y = 1 - y
    return Image.fromarray((y * 255).round().astype(np.uint8), "L")
