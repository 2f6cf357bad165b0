"""DICOM series of the kinds that make dcm2niix write several volumes for one series, and one series in
each transfer syntax dcm2niix decodes (issue 9).

Every generator starts from the realistic single-frame series of `dicomflow.samples` (geometry, phantom
pixels, deterministic UIDs) and changes only what the kind is about, so a test can tell which property
made dcm2niix split, decode or lose a volume:

- multi-echo: EchoTime/EchoNumbers vary (dcm2niix splits by echo and names `_e2`, `_e3`, ...);
- magnitude and phase, real and imaginary: ImageType (0008,0008) value 3 is M/P/R/I, which dcm2niix reads
  as its `isHasPhase`/`isHasReal`/`isHasImaginary` and names `_ph`, `_real`, `_imaginary`;
- Philips fieldmap: one series holding a magnitude image (ORIGINAL) and a B0 map in Hz (DERIVED, its own
  rescale): dcm2niix never stacks original with derived images (`isSameSet`) and has no suffix for it;
- one SeriesInstanceUID with several SeriesNumbers (some exports renumber a re-run series but keep its
  UID): dcm2niix splits by SeriesNumber, and a literal `-f` name has no `%s` to tell them apart;
- a classic copy plus an enhanced multi-frame copy (PS3.3 A.36, Enhanced MR Image) of the same series;
- transfer syntaxes: pixel data re-encoded with pydicom (RLE, deflate, big endian, implicit VR) and
  imagecodecs (JPEG baseline/lossless, JPEG-LS, JPEG 2000), encapsulated per PS3.5 A.4.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicomflow import samples
from dicomflow.samples import SeriesSpec

ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
PHILIPS = "Philips Medical Systems"


@dataclass(frozen=True)
class Written:
    """A folder of DICOM files made by one generator. `series_uids` lists the SeriesInstanceUIDs in it."""

    name: str
    folder: Path
    paths: tuple[Path, ...]
    series_uids: tuple[str, ...]


def _datasets(spec: SeriesSpec, seed: int) -> list[Dataset]:
    return list(samples.iter_datasets(spec, seed=seed))


def _new_instance(ds: Dataset, seed: int, *parts: object) -> None:
    """Give a derived copy its own SOPInstanceUID (file meta too), as a scanner would."""
    uid = samples.derive_uid(seed, "kinds", ds.SOPInstanceUID, *parts)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)


def _pixels(ds: Dataset) -> np.ndarray:
    dtype = "<i2" if int(ds.PixelRepresentation) else "<u2"
    return np.frombuffer(ds.PixelData, dtype=dtype).reshape(int(ds.Rows), int(ds.Columns))


def _save(datasets: Sequence[Dataset], folder: Path, name: str, series_uids: Sequence[str]) -> Written:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / f"IM{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return Written(name, folder, tuple(paths), tuple(dict.fromkeys(series_uids)))


# --- multi-output kinds -----------------------------------------------------------------------------


def multi_echo(folder: Path, seed: int = 1) -> Written:
    spec = SeriesSpec(kind="mr3d", slices=6, rows=16, columns=16, series_number=5, echo_times_ms=(4.0, 9.0, 14.0))
    datasets = _datasets(spec, seed)
    return _save(datasets, folder, "multi_echo", [datasets[0].SeriesInstanceUID])


def _image_type_copies(
    spec: SeriesSpec, seed: int, variants: Sequence[tuple[str, Callable[[np.ndarray], np.ndarray]]]
) -> list[Dataset]:
    """One copy of the series per (ImageType value 3, pixel transform), same geometry and SeriesInstanceUID;
    InstanceNumbers continue across copies as scanners number them."""
    base = _datasets(spec, seed)
    out: list[Dataset] = []
    for number, (kind, transform) in enumerate(variants):
        for ds in base:
            copy_ = copy.deepcopy(ds)
            image_type = list(copy_.ImageType)
            image_type[2] = kind
            copy_.ImageType = image_type
            if number:
                _new_instance(copy_, seed, kind)
                copy_.InstanceNumber = int(ds.InstanceNumber) + number * len(base)
                copy_.PixelData = np.ascontiguousarray(transform(_pixels(ds))).astype("<u2").tobytes()
            out.append(copy_)
    return out


def _phase(pixels: np.ndarray) -> np.ndarray:
    return 4095 - pixels


def _imaginary(pixels: np.ndarray) -> np.ndarray:
    return (pixels // 2 + 1000) % 4096


def magnitude_phase(folder: Path, seed: int = 2) -> Written:
    spec = SeriesSpec(kind="mr3d", slices=5, rows=16, columns=16, series_number=6, series_description="GRE_mag_phase")
    datasets = _image_type_copies(spec, seed, [("M", _phase), ("P", _phase)])
    return _save(datasets, folder, "magnitude_phase", [datasets[0].SeriesInstanceUID])


def real_imaginary(folder: Path, seed: int = 3) -> Written:
    spec = SeriesSpec(kind="mr3d", slices=5, rows=16, columns=16, series_number=7, series_description="GRE_complex")
    datasets = _image_type_copies(spec, seed, [("R", _phase), ("I", _imaginary)])
    return _save(datasets, folder, "real_imaginary", [datasets[0].SeriesInstanceUID])


def philips_fieldmap(folder: Path, seed: int = 4) -> Written:
    """A Philips B0 fieldmap series: the magnitude image (ORIGINAL) and the field map in Hz (DERIVED, with
    its own rescale), one SeriesInstanceUID and SeriesNumber, as the scanner exports them."""
    spec = SeriesSpec(
        kind="mr3d", slices=5, rows=16, columns=16, series_number=8, series_description="B0_map", manufacturer=PHILIPS
    )
    base = _datasets(spec, seed)
    out: list[Dataset] = []
    for ds in base:
        magnitude = copy.deepcopy(ds)
        magnitude.ImageType = ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]
        out.append(magnitude)
    for ds in base:
        b0 = copy.deepcopy(ds)
        _new_instance(b0, seed, "b0")
        b0.ImageType = ["DERIVED", "PRIMARY", "B0", "B0", "UNSPECIFIED"]
        b0.InstanceNumber = int(ds.InstanceNumber) + len(base)
        b0.RescaleIntercept = "-500"
        b0.RescaleSlope = "0.25"
        b0.RescaleType = "Hz"
        b0.PixelData = _phase(_pixels(ds)).astype("<u2").tobytes()
        out.append(b0)
    return _save(out, folder, "philips_fieldmap", [base[0].SeriesInstanceUID])


def several_series_numbers(folder: Path, seed: int = 5) -> Written:
    """One SeriesInstanceUID, two SeriesNumbers (a re-run renumbered by the scanner, UID kept)."""
    first = _datasets(SeriesSpec(kind="mr3d", slices=4, rows=16, columns=16, series_number=9), seed)
    second = _datasets(SeriesSpec(kind="mr3d", slices=4, rows=16, columns=16, series_number=10), seed + 100)
    uid = first[0].SeriesInstanceUID
    for ds in second:
        ds.SeriesInstanceUID = uid
        ds.SeriesDescription = first[0].SeriesDescription
        ds.ProtocolName = first[0].ProtocolName
        # Brighter, so a swapped or lost volume changes voxels.
        ds.PixelData = np.clip(_pixels(ds).astype(np.int32) + 300, 0, 4095).astype("<u2").tobytes()
    return _save(first + second, folder, "several_series_numbers", [uid])


def enhanced_copy(datasets: Sequence[Dataset], seed: int) -> Dataset:
    """The Enhanced MR Image (PS3.3 A.36.2) holding the same frames as the classic `datasets` (one
    volume): shared geometry in the Shared Functional Groups, each frame's position and dimension index
    in its Per-Frame Functional Groups item, as Philips and Siemens XA export them."""
    first = datasets[0]
    ds = Dataset()
    ds.file_meta = copy.deepcopy(first.file_meta)
    uid = samples.derive_uid(seed, "enhanced", first.SeriesInstanceUID)
    ds.file_meta.MediaStorageSOPClassUID = UID(ENHANCED_MR_IMAGE_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    skip = {
        "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
        "RepetitionTime", "EchoTime", "FlipAngle", "InstanceNumber", "SliceLocation", "PixelData", "SOPInstanceUID",
        "SOPClassUID", "AcquisitionTime", "ContentTime", "EchoNumbers", "AcquisitionNumber", "ScanningSequence",
        "SequenceVariant", "SequenceName", "EchoTrainLength", "WindowCenter", "WindowWidth",
    }  # fmt: skip
    for element in first:
        if element.keyword not in skip:
            ds.add(copy.deepcopy(element))
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = uid
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.AcquisitionDateTime = f"{first.StudyDate}{first.AcquisitionTime}"
    ds.ContentTime = first.ContentTime
    ds.NumberOfFrames = len(datasets)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    measures.SpacingBetweenSlices = first.SpacingBetweenSlices
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    timing = Dataset()
    timing.RepetitionTime = first.RepetitionTime
    timing.FlipAngle = first.FlipAngle
    shared.MRTimingAndRelatedParametersSequence = DicomSequence([timing])
    echo = Dataset()
    echo.EffectiveEchoTime = float(first.EchoTime)
    shared.MREchoSequence = DicomSequence([echo])
    transform = Dataset()
    transform.RescaleIntercept = "0"
    transform.RescaleSlope = "1"
    transform.RescaleType = "US"
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for index, source in enumerate(datasets):
        frame = Dataset()
        position = Dataset()
        position.ImagePositionPatient = source.ImagePositionPatient
        frame.PlanePositionSequence = DicomSequence([position])
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = index + 1
        content.DimensionIndexValues = [1, index + 1]
        content.FrameAcquisitionDateTime = f"{first.StudyDate}{source.AcquisitionTime}"
        frame.FrameContentSequence = DicomSequence([content])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    organization = Dataset()
    organization.DimensionOrganizationUID = samples.derive_uid(seed, "dimension", uid)
    ds.DimensionOrganizationSequence = DicomSequence([organization])
    indices = []
    for pointer, group in ((0x00209056, 0x00209111), (0x00209057, 0x00209111)):  # StackID, InStackPositionNumber
        index_ds = Dataset()
        index_ds.DimensionOrganizationUID = organization.DimensionOrganizationUID
        index_ds.DimensionIndexPointer = pointer
        index_ds.FunctionalGroupPointer = group
        indices.append(index_ds)
    ds.DimensionIndexSequence = DicomSequence(indices)
    ds.add_new(0x7FE00010, "OW", b"".join(bytes(d.PixelData) for d in datasets))
    return ds


def classic_and_enhanced(folder: Path, seed: int = 6) -> Written:
    """The classic single-frame files of a series and its enhanced multi-frame copy, one SeriesInstanceUID
    (DESIGN.md §9: one vendor exports both)."""
    spec = SeriesSpec(kind="mr3d", slices=6, rows=16, columns=16, series_number=11, series_description="T1_both")
    classic = _datasets(spec, seed)
    enhanced = enhanced_copy(classic, seed)
    return _save([*classic, enhanced], folder, "classic_and_enhanced", [classic[0].SeriesInstanceUID])


def enhanced_multi_frame(folder: Path, seed: int = 7) -> Written:
    """One enhanced multi-frame file holding the frames of two echoes: one file, eight frames. (The pinned
    dcm2niix stacks these synthetic frames into one volume; the point is that frames are not files.)"""
    spec = SeriesSpec(kind="mr3d", slices=4, rows=16, columns=16, series_number=12, echo_times_ms=(5.0, 10.0))
    classic = _datasets(spec, seed)
    per_echo = len(classic) // 2
    ds = enhanced_copy(classic[:per_echo], seed)
    ds.NumberOfFrames = len(classic)
    frames = list(ds.PerFrameFunctionalGroupsSequence)
    shared = ds.SharedFunctionalGroupsSequence[0]
    del shared.MREchoSequence
    all_frames = []
    for echo, echo_time in enumerate((5.0, 10.0)):
        for index, template in enumerate(frames):
            frame = copy.deepcopy(template)
            echo_ds = Dataset()
            echo_ds.EffectiveEchoTime = echo_time
            frame.MREchoSequence = DicomSequence([echo_ds])
            frame.FrameContentSequence[0].DimensionIndexValues = [echo + 1, index + 1]
            all_frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(all_frames)
    ds.DimensionIndexSequence[0].DimensionIndexPointer = 0x00189082  # EffectiveEchoTime
    ds.DimensionIndexSequence[0].FunctionalGroupPointer = 0x00189114  # MREchoSequence
    ds.PixelData = b"".join(bytes(d.PixelData) for d in classic)
    return _save([ds], folder, "enhanced_multi_frame", [ds.SeriesInstanceUID])


KINDS: dict[str, Callable[[Path], Written]] = {
    "multi_echo": multi_echo,
    "magnitude_phase": magnitude_phase,
    "real_imaginary": real_imaginary,
    "philips_fieldmap": philips_fieldmap,
    "several_series_numbers": several_series_numbers,
    "classic_and_enhanced": classic_and_enhanced,
    "enhanced_multi_frame": enhanced_multi_frame,
}


# --- transfer syntaxes ------------------------------------------------------------------------------


def _as_8_bit(ds: Dataset) -> np.ndarray:
    """JPEG baseline (process 1) holds 8-bit samples only: keep the top 8 of the 12 stored bits."""
    pixels = (_pixels(ds) >> 4).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    return pixels


def _encoder(syntax: str) -> Callable[[Dataset], bytes]:
    import imagecodecs

    def baseline(ds: Dataset) -> bytes:
        return bytes(imagecodecs.jpeg8_encode(_as_8_bit(ds), level=95))

    def lossless(predictor: int) -> Callable[[Dataset], bytes]:
        # libjpeg-turbo 3 writes SOF3 (process 14) with the chosen predictor; PS3.5 A.4.1 allows 1-7 for
        # 1.2.840.10008.1.2.4.57 and exactly 1 for the SV1 syntax.
        return lambda ds: bytes(
            imagecodecs.jpeg8_encode(_pixels(ds), lossless=True, predictor=predictor, bitspersample=12)
        )

    def jpegls(near: int) -> Callable[[Dataset], bytes]:
        return lambda ds: bytes(imagecodecs.jpegls_encode(_pixels(ds), level=near))

    def j2k(reversible: bool) -> Callable[[Dataset], bytes]:
        return lambda ds: bytes(
            imagecodecs.jpeg2k_encode(
                _pixels(ds), level=0 if reversible else 40, codecformat="J2K", reversible=reversible, bitspersample=12
            )
        )

    table: dict[str, Callable[[Dataset], bytes]] = {
        JPEGBaseline8Bit: baseline,
        JPEGLossless: lossless(6),
        JPEGLosslessSV1: lossless(1),
        JPEGLSLossless: jpegls(0),
        JPEGLSNearLossless: jpegls(2),
        JPEG2000Lossless: j2k(True),
        JPEG2000: j2k(False),
    }
    return table[syntax]


TRANSFER_SYNTAXES: tuple[str, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
)
LOSSY = frozenset({JPEGBaseline8Bit, JPEGLSNearLossless, JPEG2000})
# Encoded with imagecodecs (the test extra); the others need pydicom and numpy only.
IMAGECODECS_SYNTAXES = frozenset(
    {JPEGBaseline8Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000}
)


def in_transfer_syntax(folder: Path, syntax: str, seed: int = 20) -> Written:
    """A small MR series with its pixel data stored in `syntax`."""
    spec = SeriesSpec(kind="mr3d", slices=5, rows=24, columns=20, series_number=20, series_description="TS")
    datasets = _datasets(spec, seed)
    for ds in datasets:
        if syntax == RLELossless:
            ds.compress(RLELossless, encoding_plugin="pydicom")
        elif syntax == ExplicitVRBigEndian:
            # pydicom writes OW bytes as given: swap them so the values stay the same in big endian.
            ds.PixelData = _pixels(ds).astype(">u2").tobytes()
        elif syntax not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
            frame = _encoder(syntax)(ds)
            ds.PixelData = encapsulate([frame])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
            if syntax in LOSSY:
                ds.LossyImageCompression = "01"
        # Deflate needs nothing here: pydicom deflates the dataset when it writes the file (PS3.5 A.5).
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / f"IM{index:05d}.dcm"
        if syntax == ExplicitVRBigEndian:
            ds.save_as(path, enforce_file_format=True, little_endian=False, implicit_vr=False)
        elif syntax == ImplicitVRLittleEndian:
            ds.save_as(path, enforce_file_format=True, implicit_vr=True)
        else:
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return Written(f"ts_{syntax}", folder, tuple(paths), (datasets[0].SeriesInstanceUID,))
