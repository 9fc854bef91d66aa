"""CT files read and written slab by slab, so a whole series never has to sit in memory.

:class:`VolumeSource` reads slices of an NRRD, MetaImage or NIfTI file by index (raw data
read slab by slab with plain file reads; gzip data inflated once into a temporary raw file);
:class:`StreamedOutput` collects a result in a temporary raw file and writes the final file
from it, renamed into place only when complete. ``inference.denoise_file`` joins the two.
"""
from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np

from . import CoreDiffError
from .atomic import atomic_path, partial_prefix, process_alive


#: numpy dtypes of the SimpleITK scalar pixel types a CT file can hold
_SITK_DTYPES = {"sitkInt8": np.int8, "sitkUInt8": np.uint8, "sitkInt16": np.int16, "sitkUInt16": np.uint16,
                "sitkInt32": np.int32, "sitkUInt32": np.uint32, "sitkFloat32": np.float32,
                "sitkFloat64": np.float64}
_NRRD_TYPES = {"short": np.int16, "short int": np.int16, "signed short": np.int16, "int16": np.int16,
               "int16_t": np.int16, "ushort": np.uint16, "unsigned short": np.uint16, "uint16": np.uint16,
               "int": np.int32, "signed int": np.int32, "int32": np.int32, "uint": np.uint32,
               "unsigned int": np.uint32, "uint32": np.uint32, "float": np.float32, "double": np.float64,
               "uchar": np.uint8, "uint8": np.uint8, "unsigned char": np.uint8, "char": np.int8,
               "signed char": np.int8, "int8": np.int8}


def earlier_corediff(header: dict[str, str]) -> str | None:
    """What CoreDiff run made a file, from its header (NRRD / MetaImage keys, NIfTI's descrip,
    DICOM ImageComments), or None: a scan denoised twice is smoothed twice."""
    if header.get("corediff_model"):
        return f"{header['corediff_model']}, {header.get('corediff_steps', '?')} steps"
    for key in ("descrip", "ITK_FileNotes", "0020|4000"):
        text = header.get(key, "").strip()
        if text.startswith("CoreDiff "):
            return text[len("CoreDiff "):]
    return None


def _itk_quiet():
    """:func:`dicom.itk_warnings_off`, imported when first used (SimpleITK loads with it)."""
    from .dicom import itk_warnings_off
    return itk_warnings_off()


def _image_header(path):
    """SimpleITK's reader of an image file with its header read, or None (a folder, or a file
    it cannot read: the full reader then says why)."""
    import SimpleITK as sitk
    if not Path(path).is_file():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _itk_quiet():  # e.g. a NIfTI's sheared sform: said in words (io.nifti_shear_warning)
            reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _earlier_in(reader) -> str | None:
    """:func:`earlier_corediff` of the header a SimpleITK reader has read (None: no reader)."""
    return None if reader is None else earlier_corediff({k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()})


def earlier_corediff_of_file(path) -> str | None:
    """:func:`earlier_corediff` of an image file's header (None for a folder or an unreadable one)."""
    return _earlier_in(_image_header(path))


class SliceIndexable(Protocol):
    """What the denoisers and the dose estimate read a volume through: a NumPy array (or memmap),
    a :class:`VolumeSource`, or anything with a shape that gives ``[a:b]`` -> (b-a, H, W)."""
    shape: tuple[int, ...]

    def __getitem__(self, key) -> np.ndarray: ...


_UNPACKED_PREFIX = "corediff-in-"


def unpacked_input_file(suffix: str, temp_dir=None) -> tuple[int, str]:
    """``mkstemp`` for an unpacked input, named after this host and process.

    A run killed outright (SIGKILL, the out-of-memory killer) removes nothing, and its unpacked
    input can be gigabytes: each new one first removes those of this host's processes that are gone.
    """
    import socket
    folder = Path(temp_dir or tempfile.gettempdir())
    host = socket.gethostname().replace("-", "_")
    for leftover in folder.glob(f"{_UNPACKED_PREFIX}{host}.*-*"):
        pid = leftover.name[len(_UNPACKED_PREFIX) + len(host) + 1:].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            try:
                leftover.unlink()
            except OSError:  # another user's, or already gone
                pass
    return tempfile.mkstemp(suffix=suffix, prefix=f"{_UNPACKED_PREFIX}{host}.{os.getpid()}-", dir=folder)


class VolumeSource:
    """A CT file read slab by slab: ``shape``, ``ndim``, ``dtype`` and ``src[a:b]`` -> (b-a, H, W).

    Uncompressed MHA and NIfTI are read in place through SimpleITK's streaming extraction;
    raw NRRD is read slab by slab with plain file reads (:class:`RawSlabs`); gzip NRRD,
    compressed MHA and .nii.gz are first inflated chunk by chunk into a temporary file (bounded
    memory, one pass). ``open`` returns None for what cannot be streamed (DICOM folders,
    detached headers, big-endian data...).
    """

    def __init__(self, shape, dtype, reader=None, array=None, info=None, temp_files=()):
        self.shape = tuple(int(s) for s in shape)
        self.ndim = 3
        self.dtype = np.dtype(dtype)
        self._reader, self._array = reader, array  # array: a RawSlabs (explicit reads, no mmap)
        self.info = info or {}
        self._temps = list(temp_files)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, slice):
            raise TypeError("VolumeSource supports slab slices src[a:b] only")
        a, b, step = key.indices(self.shape[0])
        if step != 1:
            raise TypeError("VolumeSource slabs must be contiguous")
        if self._array is not None:
            return np.asarray(self._array[a:b])
        import SimpleITK as sitk
        if b <= a:
            return np.empty((0,) + self.shape[1:], self.dtype)
        self._reader.SetExtractIndex((0, 0, a))
        self._reader.SetExtractSize((self.shape[2], self.shape[1], b - a))
        try:
            with _itk_quiet():
                return sitk.GetArrayFromImage(self._reader.Execute())
        except RuntimeError as exc:  # a file damaged past its header
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
            raise CoreDiffError(f"cannot read slices {a}:{b} of {self.info.get('source', 'the input')} ({last}): "
                                "was it changed or truncated while being read?") from None

    def close(self) -> None:
        self._array = None
        for p in self._temps:
            try:
                os.unlink(p)
            except OSError:
                pass
        self._temps = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @classmethod
    def open(cls, path, temp_dir=None) -> "VolumeSource | None":
        """A reader of ``path`` by slabs, or None where the format is read whole.

        A compressed input is unpacked to a temporary file in ``temp_dir`` (default: the
        system's), removed by :meth:`close`.
        """
        import SimpleITK as sitk
        p = Path(path)
        name = p.name.lower()
        reader = _image_header(p) if name.endswith((".mha", ".mhd", ".nii", ".nii.gz", ".nrrd")) else None
        if reader is None:
            return None
        size = reader.GetSize()
        if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
            return None
        dtype = {getattr(sitk, k): v for k, v in _SITK_DTYPES.items()}.get(reader.GetPixelID())
        shape = (size[2], size[1], size[0])
        info = {"spacing": tuple(reader.GetSpacing()), "origin": tuple(reader.GetOrigin()),
                "direction": tuple(reader.GetDirection()),
                "pixel_type": str(np.dtype(dtype)) if dtype is not None else "float32", "source": str(p)}
        earlier = _earlier_in(reader)
        if earlier:
            info["earlier_corediff"] = earlier
        nbytes = None if dtype is None else int(np.prod(shape)) * np.dtype(dtype).itemsize
        try:
            if name.endswith(".nrrd"):
                return cls._open_nrrd(p, shape, info, nbytes, temp_dir)
            if name.endswith((".mha", ".mhd")):
                header = _read_text_header(p, b"ElementDataFile")
                fields = _metaimage_fields(header)
                big_endian = "true" in (fields.get("byteordermsb", ""), fields.get("binarydatabyteordermsb", ""))
                if nbytes is not None and np.dtype(dtype).itemsize > 1 and big_endian:
                    return None  # big-endian: SimpleITK's full reader swaps the bytes, the slab readers do not
                if fields.get("compresseddata") != "true":
                    data = header_data_file(p, header)  # None: a list of slice files
                    if nbytes is not None and data is not None:
                        _check_complete(p, data, nbytes + (len(header) if data == p else 0))
                    return cls(shape, dtype or np.float32, reader=reader, info=info)
                if not name.endswith(".mha") or nbytes is None:
                    return None
                return cls._inflate(p, len(header), shape, dtype, info, nbytes, temp_dir, "zlib")
            if name.endswith(".nii"):
                least = _nifti_file_bytes(_head_bytes(p, 544))
                if least is not None:
                    _check_complete(p, p, least)
                return cls(shape, dtype or np.float32, reader=reader, info=info)
            if name.endswith(".nii.gz") and _head_bytes(p, 2) == b"\x1f\x8b":  # else not compressed: ITK's own read
                fd, tmp = unpacked_input_file(".nii", temp_dir)
                try:
                    with os.fdopen(fd, "wb") as f, gzip.open(p, "rb") as g:
                        shutil.copyfileobj(g, f, 1 << 22)
                    least = _nifti_file_bytes(_head_bytes(Path(tmp), 544))
                    if least is not None:
                        _check_complete(p, Path(tmp), least)
                except (EOFError, zlib.error, gzip.BadGzipFile, CoreDiffError):
                    os.unlink(tmp)
                    raise CoreDiffError(f"{p} is truncated or damaged (its compressed data end early): "
                                        "copy or export it again") from None
                except BaseException:  # a full disk, Ctrl-C: the inflated part goes too
                    os.unlink(tmp)
                    raise
                r2 = sitk.ImageFileReader()
                r2.SetFileName(tmp)
                with _itk_quiet():
                    r2.ReadImageInformation()
                return cls(shape, dtype or np.float32, reader=r2, info=info, temp_files=[tmp])
        except (OSError, ValueError):
            return None
        return None

    @classmethod
    def _open_nrrd(cls, p, shape, info, nbytes, temp_dir):
        raw = _head_bytes(p, 1 << 16)
        end = raw.find(b"\n\n")
        if end < 0 or nbytes is None:
            return None
        fields = {}
        for line in raw[:end].decode("latin-1").splitlines()[1:]:
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip().lstrip("=").strip()
        dtype = _NRRD_TYPES.get(fields.get("type", "").lower())
        if dtype is None or "data file" in fields or "datafile" in fields or fields.get("line skip", "0") != "0" \
                or fields.get("byte skip", "0") != "0":
            return None
        if np.dtype(dtype).itemsize > 1 and fields.get("endian", "little") != "little":
            return None
        offset = end + 2
        encoding = fields.get("encoding", "raw").lower()
        if encoding == "raw":
            if p.stat().st_size < offset + nbytes:
                return None
            return cls(shape, dtype, array=RawSlabs(p, shape, dtype, offset), info=info)
        if encoding in ("gzip", "gz"):
            return cls._inflate(p, offset, shape, dtype, info, nbytes, temp_dir, "gzip")
        return None

    @classmethod
    def _inflate(cls, p, offset, shape, dtype, info, nbytes, temp_dir, kind):
        fd, tmp = unpacked_input_file(".raw", temp_dir)
        try:
            with os.fdopen(fd, "wb") as f, open(p, "rb") as src:
                src.seek(offset)
                z = zlib.decompressobj(16 + zlib.MAX_WBITS if kind == "gzip" else zlib.MAX_WBITS)
                while True:
                    chunk = src.read(1 << 22)
                    if not chunk:
                        break
                    f.write(z.decompress(chunk))
                    if z.eof:
                        break
                f.write(z.flush())
            if os.path.getsize(tmp) < nbytes:  # the full readers would fill the rest with zeros
                raise CoreDiffError(f"{p} is truncated or damaged (its compressed data end early): "
                                    "copy or export it again")
            return cls(shape, dtype, array=RawSlabs(tmp, shape, dtype), info=info, temp_files=[tmp])
        except BaseException:
            os.unlink(tmp)
            raise


class RawSlabs:
    """Slices of a raw little-endian (z, y, x) array in a file, read and written with plain
    file I/O. Unlike ``np.memmap``, touched pages do not stay mapped into the process, so
    resident memory stays at one slab however large the volume is."""

    def __init__(self, path, shape, dtype, offset: int = 0, mode: str = "r"):
        self.path, self.shape, self.offset = str(path), tuple(shape), int(offset)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.ndim = 3
        self._slice = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        if mode == "w+":
            with open(self.path, "r+b" if os.path.exists(self.path) else "wb") as f:
                f.truncate(self.offset + self._slice * self.shape[0])

    def _range(self, key) -> tuple[int, int]:
        if not isinstance(key, slice):
            raise TypeError("slab access takes a slice a:b")
        a, b, step = key.indices(self.shape[0])
        if step != 1:
            raise TypeError("slabs must be contiguous")
        return a, max(a, b)

    def __getitem__(self, key) -> np.ndarray:
        a, b = self._range(key)
        with open(self.path, "rb") as f:
            f.seek(self.offset + a * self._slice)
            data = np.fromfile(f, dtype=self.dtype, count=(b - a) * self._slice // self.dtype.itemsize)
        if data.size * self.dtype.itemsize != (b - a) * self._slice:
            raise CoreDiffError(f"{self.path} is shorter than its header says: was it changed or truncated while "
                                "being read? Nothing was written; run again on a complete copy")
        return data.reshape((b - a,) + self.shape[1:]).astype(self.dtype.newbyteorder("="), copy=False)

    def __setitem__(self, key, value) -> None:
        a, b = self._range(key)
        data = np.ascontiguousarray(np.broadcast_to(np.asarray(value).astype(self.dtype, copy=False),
                                                    (b - a,) + self.shape[1:]))
        with open(self.path, "r+b") as f:
            f.seek(self.offset + a * self._slice)
            f.write(data.tobytes())


def _head_bytes(p: Path, n: int) -> bytes:
    with open(p, "rb") as f:
        return f.read(n)


#: headers whose voxels lie in a data file they name
DETACHED_SUFFIXES = (".nhdr", ".mhd")


def detached_data_file(path: str | os.PathLike) -> Path | None:
    """The data file a detached header (.nhdr, .mhd) names, other than itself; None for other files."""
    p = Path(path)
    if not (p.name.lower().endswith(DETACHED_SUFFIXES) and p.is_file()):
        return None
    data = header_data_file(p)
    return None if data == p else data


def header_data_file(header: str | os.PathLike, text: str | None = None) -> Path | None:
    """The file holding the pixels a MetaImage (.mha / .mhd) or detached NRRD (.nhdr) header
    names: the header itself for embedded data (LOCAL), None for a list of files or a pattern
    (or no such line). ``text``: the header, when already read."""
    header = Path(header)
    if text is None:
        text = _head_bytes(header, 1 << 16).decode("latin-1")
    sep = ":" if header.name.lower().endswith((".nhdr", ".nrrd")) else "="
    for line in text.splitlines():
        key, found, value = line.partition(sep)
        if found and key.strip().lower() in ("elementdatafile", "data file", "datafile"):
            value = value.strip().lstrip("=").strip()
            if value.upper() == "LOCAL":
                return header
            if value.upper().startswith("LIST") or "%" in value:  # a list of files, or a pattern
                return None
            return header.parent / value
    return None


def nifti_written_completely(path: Path) -> bool:
    """Whether a NIfTI file (.nii, or .nii.gz read through) holds all the bytes its header
    announces: SimpleITK's NIfTI writer only prints an error when the disk is full, and leaves
    a short file behind."""
    name = path.name.lower()
    try:
        if name.endswith(".nii"):
            least = _nifti_file_bytes(_head_bytes(path, 544))
            return least is None or path.stat().st_size >= least
        if name.endswith(".nii.gz"):
            with gzip.open(path, "rb") as g:
                least, total = _nifti_file_bytes(g.read(544)), 0
                g.seek(0)
                while True:
                    chunk = g.read(1 << 22)
                    if not chunk:
                        break
                    total += len(chunk)
            return least is None or total >= least
    except (OSError, EOFError, zlib.error):
        return False
    return True


def _check_complete(header: Path, data: Path, least: int) -> None:
    """Refuse a file whose data stop short: SimpleITK's readers would fill the rest with zeros
    (NIfTI) or fail halfway through the run."""
    if not data.is_file():
        raise CoreDiffError(f"{header}: its data file {data.name} is missing: keep it beside the header")
    if data.stat().st_size < least:
        raise CoreDiffError(f"{header} is truncated ({data.stat().st_size} of at least {least} bytes): "
                            "copy or export it again")


def _metaimage_fields(header: str) -> dict[str, str]:
    """A MetaImage header's 'Key = Value' lines (spaces optional), keys and values lower-cased."""
    fields = {}
    for line in header.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip().lower()
    return fields


def _nifti_file_bytes(head: bytes) -> int | None:
    """The size a complete NIfTI-1 or -2 file has: its data offset plus the voxels as stored
    (bitpix; a scaled file reads as float32, twice its stored int16), or None if unreadable."""
    import struct
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            ndim_and_dims = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            ndim_and_dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        return None
    ndim = ndim_and_dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(1, int(d)) for d in ndim_and_dims[1:ndim + 1]], dtype=np.int64))
    return max(int(offset), 348) + voxels * bitpix // 8


def _read_text_header(p: Path, last_key: bytes) -> str:
    head = _head_bytes(p, 1 << 16)
    i = head.find(last_key)
    if i < 0:
        raise ValueError("no header end")
    j = head.find(b"\n", i)
    return head[:j + 1].decode("latin-1")


def output_dtype(pixel_type: str, value_range: tuple[float, float] | None = None) -> np.dtype:
    """Keep integer CT types that hold [-1024, 3072] and any padding; else float32. int32 (what
    ITK makes of int16 DICOM with its rescale intercept) is narrowed to int16 when the input's
    ``value_range`` fits it, as :func:`io.write_volume` does for whole volumes: an output holds
    the input's own values where it keeps them (padding, metal) and [-1024, 3072] elsewhere."""
    dt = np.dtype(pixel_type)
    if dt == np.dtype(np.int32) and value_range is not None \
            and -32768 <= value_range[0] and value_range[1] <= 32767:
        return np.dtype(np.int16)
    if dt in (np.dtype(np.int16), np.dtype(np.int32)):
        return dt
    return np.dtype(np.float32)


class StreamedOutput:
    """Collects a denoised volume in a temporary raw file next to the output (``array``, a
    :class:`RawSlabs`) and writes the final file at the end, slab by slab, then renames it
    into place (atomic; memory bounded by one slab).

    .mha (uncompressed), .nrrd (gzip) and .nii / .nii.gz are written as a header made by
    SimpleITK for one slice of the same geometry (with the slice count patched) followed by
    the streamed voxels. Other outputs (.mhd, .nhdr, DICOM) are written whole by
    :func:`io.write_volume` (``inference.denoise_file`` sends them there).
    """

    FORMATS = (".mha", ".nrrd", ".nii", ".nii.gz")
    #: bytes of voxels written at a time: memory stays bounded whatever the volume's size
    WRITE_CHUNK_BYTES = 1 << 24

    def __init__(self, path, shape, info: dict, dtype, metadata: dict[str, str] | None = None):
        self.path = Path(path).expanduser()
        if not self.path.name.lower().endswith(self.FORMATS):
            raise ValueError(f"StreamedOutput writes {', '.join(self.FORMATS)}, not {self.path.name}")
        self.shape, self.info, self.dtype = tuple(shape), info, np.dtype(dtype)
        self.metadata = metadata
        fd, self._raw = tempfile.mkstemp(prefix=partial_prefix(self.path), suffix=".raw",
                                         dir=self.path.parent)  # the pid: a killed run's is told apart
        os.close(fd)
        try:
            self.array = RawSlabs(self._raw, self.shape, self.dtype, mode="w+")
        except BaseException:  # a size it cannot have (a file size limit, FAT32's 4 GB): nothing left behind
            os.unlink(self._raw)
            raise

    def _header(self) -> bytes:
        import SimpleITK as sitk
        name = self.path.name.lower()
        one = sitk.GetImageFromArray(np.zeros((1,) + self.shape[1:], self.dtype))
        one.SetSpacing(tuple(float(s) for s in self.info["spacing"]))
        one.SetOrigin(tuple(float(o) for o in self.info["origin"]))
        one.SetDirection(tuple(float(d) for d in self.info["direction"]))
        from .io import set_provenance
        set_provenance(one, self.metadata)
        ext = ".nii" if name.endswith((".nii", ".nii.gz")) else Path(name).suffix
        fd, tmp = tempfile.mkstemp(suffix=ext, dir=self.path.parent, prefix=".corediff-header-")
        os.close(fd)
        try:
            sitk.WriteImage(one, tmp, ext == ".nrrd")
            data = Path(tmp).read_bytes()
        finally:
            os.unlink(tmp)
        nz, ny, nx = self.shape
        if ext == ".mha":
            end = data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
            head = data[:end].decode("latin-1")
            head = head.replace(f"DimSize = {nx} {ny} 1\n", f"DimSize = {nx} {ny} {nz}\n")
            if f"DimSize = {nx} {ny} {nz}\n" not in head:
                raise ValueError("unexpected MHA header")
            return head.encode("latin-1")
        if ext == ".nrrd":
            end = data.index(b"\n\n") + 2
            head = data[:end].decode("latin-1")
            if f"sizes: {nx} {ny} 1\n" not in head or "encoding: gzip" not in head:
                raise ValueError("unexpected NRRD header")
            return head.replace(f"sizes: {nx} {ny} 1\n", f"sizes: {nx} {ny} {nz}\n").encode("latin-1")
        import struct

        from .io import NIFTI_MOST_VOXELS_PER_AXIS
        vox_offset = int(struct.unpack("<f", data[108:112])[0])
        dims = list(struct.unpack("<8h", data[40:56]))
        if dims[:4] != [3, nx, ny, 1] or nz > NIFTI_MOST_VOXELS_PER_AXIS:  # io.check_output_dimensions refuses it first
            raise ValueError("unexpected NIfTI header")
        dims[3] = nz
        head = bytearray(data[:vox_offset])
        head[40:56] = struct.pack("<8h", *dims)
        return bytes(head)

    def commit(self, replace: bool = True) -> Path:
        """Write the file; ``replace`` False keeps one that appeared at its path meanwhile
        (:class:`atomic.OutputAppeared`)."""
        name = self.path.name.lower()
        try:
            header = self._header()
            gz = name.endswith((".nrrd", ".nii.gz"))
            with atomic_path(self.path, replace) as tmp, open(tmp, "wb") as f:
                # no file name in the gzip header (it was the temporary one) and no time: the same
                # volume gives the same bytes
                if name.endswith(".nii.gz"):
                    sink = gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=4, mtime=0)
                    sink.write(header)
                else:
                    f.write(header)
                    sink = gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=4, mtime=0) if gz else f
                step = max(1, self.WRITE_CHUNK_BYTES // max(1, int(np.prod(self.shape[1:])) * self.dtype.itemsize))
                for k in range(0, self.shape[0], step):
                    sink.write(np.ascontiguousarray(self.array[k:k + step]).astype("<" + self.dtype.str[1:],
                                                                                     copy=False).tobytes())
                if sink is not f:
                    sink.close()
        finally:
            self.close()
        return self.path

    def close(self) -> None:
        self.array = None
        try:
            if os.path.exists(self._raw):
                os.unlink(self._raw)
        except OSError as exc:  # the folder turned read-only mid-run: the run's own error is the one to report
            warnings.warn(f"could not remove the temporary {self._raw} ({exc.strerror}): delete it")
