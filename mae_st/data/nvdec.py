"""The `FrameDecoder` of `mae_st.data.clip_reader` on NVDEC: PyNvVideoCodec's SimpleDecoder, reused across videos.

Why: DALI's video decoder sets up a demuxer, parser and decoder for every sample (~25-30 ms), which caps
one-clip-per-video finetuning near 40 clips/s. One SimpleDecoder per reader thread, created once and pointed at
each new video with `reconfigure_decoder(path)`, measured 82.6 / 245.6 / 264.2 clips/s with 1 / 4 / 6 threads on
an H200 (issue 15). PyNvVideoCodec is imported only inside this module's functions: CPU machines run everything
else, and its import raises RuntimeError, not ImportError, on hosts without the driver's video libraries.

What PyNvVideoCodec 2.2.4 does that shapes this code (its SimpleDecoder.py, its docstrings and samples):
- `reconfigure_decoder` takes a path (an io.BytesIO of our webm files fails: "BinaryIO streams require containers
  with frame count in headers"), so the reader writes each video to a scratch file first.
- `get_batch_frames_by_index` drops repeated and out-of-range indices (with a warning) and returns frames in the
  order asked; we ask for the sorted distinct in-range frames and expand repeats ourselves.
- Its decoder cache picks a cached decoder that fits the new video; one "with lower widthxheight configuration"
  is replaced by a newly created decoder, and NVDEC cannot reconfigure beyond the max_width x max_height it was
  created with. So decoders are created with `max_size` (2048 x 2048 by default): a set mixing 320x240, 342x256
  and 456x256 videos reconfigures one decoder in place; a video beyond `max_size` still decodes, at the cost of
  a new decoder (the bench's mixed-resolution row measures it).
- Decoded frames live in the library's buffers and are overwritten by later calls, so they are copied out at once
  (`torch.stack` of their DLPack views) on this decoder's own CUDA stream, which is synchronised before returning.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import time
from typing import Optional, Sequence, Tuple

import torch

log = logging.getLogger(__name__)

PACKAGE = "pynvvideocodec==2.2.4"
DEFAULT_MAX_SIZE = (2048, 2048)  # width, height every decoder is created for (memory grows with it)
FAST_PATH_HINT = (f"pip install {PACKAGE} (or the [gpu] extra), in a container that has the driver's video "
                  "libraries (NVIDIA_DRIVER_CAPABILITIES including video, e.g. compute,utility,video)")


# PyNvVideoCodec's C++ logger prints a warning line for every webm video it opens ("Container format is
# matroska,webm. , Seek accuracy may be impacted."): 1,536 lines in a 40-step ViT-B/16 finetuning run, millions in a
# long one. Its level comes from LOGGER_LEVEL (TRACE, DEBUG, WARN, ERROR, FATAL); errors still print, and a level
# the user set is kept. The seeking it warns about was checked: NVDEC's frames of the packed footage against PyAV's,
# none misaligned (docs/performance.md, 2026-12-01). With the level set, two 40-step ViT-H runs on an H200 printed
# none of those lines (docs/performance.md).
_LIBRARY_LOG_LEVEL = ("LOGGER_LEVEL", "ERROR")


def _import_pynvvideocodec():
    os.environ.setdefault(*_LIBRARY_LOG_LEVEL)
    import PyNvVideoCodec

    return PyNvVideoCodec


@functools.lru_cache(maxsize=None)
def nvdec_unavailable_reason() -> Optional[str]:
    """None when reused NVDEC decoders can run here (a CUDA GPU and an importable PyNvVideoCodec), else why not."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
    try:
        _import_pynvvideocodec()
    except ImportError as err:
        return f"PyNvVideoCodec is not installed ({err})"
    except Exception as err:  # noqa: BLE001 - RuntimeError "Failed to load NVENC library: libnvidia-encode.so.1"
        return f"import PyNvVideoCodec failed: {_first_line(err)}"
    return None


def fallback_message(reason: str) -> str:
    """The one log line for a run that falls back to DALI's decoder: why, and how to get the fast path."""
    return f"reused NVDEC decoders (PyNvVideoCodec) are off: {reason}; decoding with DALI's video decoder. " \
           f"For the fast path: {FAST_PATH_HINT}"


class NvdecDecoder:
    """Decodes chosen frames of a video file to a (len(indices), H, W, 3) uint8 CUDA tensor. One per reader thread:
    it owns one SimpleDecoder (created at its first video, then reconfigured) and one CUDA stream."""

    copy_in_order = True  # False: the earlier copy-then-gather (benchmarks/nvdec_cost.py's levers section)

    def __init__(self, gpu_id: int = 0, max_size: Tuple[int, int] = DEFAULT_MAX_SIZE):
        reason = nvdec_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"NVDEC decoding is unavailable: {reason}. {FAST_PATH_HINT}")
        self._nvc = _import_pynvvideocodec()
        self.gpu_id, self.max_size = gpu_id, max_size
        self.device = torch.device("cuda", gpu_id)
        self.stream = torch.cuda.Stream(device=self.device)
        self._decoder = None
        self.scan_metadata = False  # need_scanned_stream_metadata: only for containers without a frame count
        self.videos = 0  # decode calls (one per video)
        self.frames = 0  # distinct frames handed out by the library
        self.decoders_created = 0  # SimpleDecoder constructions: 1, plus one after every failed video
        # seconds this thread spent pointing the decoder at videos, in the library's frame calls, and copying out
        # (benchmarks/nvdec_cost.py reads them: where a decoder thread's time goes)
        self.seconds = {"open": 0.0, "frames": 0.0, "copy": 0.0}

    def decode(self, path: str, frame_indices: Sequence[int]) -> torch.Tensor:
        """Frames `frame_indices` (any order, repeats allowed) of `path`, each distinct frame decoded once; an index
        past the decoder's frame count gives the last frame. Raises on a file NVDEC cannot read; the SimpleDecoder
        is then dropped, so a broken state never reaches the next video."""
        self.videos += 1
        try:
            return self._decode(path, frame_indices)
        except BaseException:
            self._decoder = None
            raise

    def _decode(self, path: str, frame_indices: Sequence[int]) -> torch.Tensor:
        started = time.perf_counter()
        decoder = self._open(path)
        if len(decoder) < 1 and not self.scan_metadata:
            decoder = self._scan_from_now_on(path)
        count = len(decoder)
        if count < 1:
            raise ValueError(f"{path}: the decoder reports no frames")
        clamped = [min(max(int(i), 0), count - 1) for i in frame_indices]
        wanted = sorted(set(clamped))
        opened = time.perf_counter()
        with torch.cuda.stream(self.stream):
            decoded = decoder.get_batch_frames_by_index(wanted)
            returned = time.perf_counter()
            if len(decoded) != len(wanted):
                raise RuntimeError(f"{path}: asked for {len(wanted)} frames, the decoder returned {len(decoded)}")
            views = dict(zip(wanted, (torch.from_dlpack(frame) for frame in decoded)))
            if self.copy_in_order:  # one copy out of the library's buffers, straight into the requested order
                frames = torch.stack([views[i] for i in clamped])
            else:  # the distinct frames, then a gather into the requested order (a second copy, an index upload)
                position = {index: p for p, index in enumerate(wanted)}
                order = torch.tensor([position[i] for i in clamped], device=self.device)
                frames = torch.stack(list(views.values())).index_select(0, order)
        self.stream.synchronize()  # the frames are complete for any stream and thread that receives them
        self.frames += len(wanted)
        self.seconds["open"] += opened - started
        self.seconds["frames"] += returned - opened
        self.seconds["copy"] += time.perf_counter() - returned
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise RuntimeError(f"{path}: expected (N, H, W, 3) uint8 RGB frames, got {tuple(frames.shape)} "
                               f"{frames.dtype}")
        return frames

    def _open(self, path: str):
        if self._decoder is not None:
            self._decoder.reconfigure_decoder(path)
            return self._decoder
        try:
            return self._create(path)
        except Exception as err:  # noqa: BLE001 - only the missing-frame-count case is retried
            if self.scan_metadata or "Elementary streams" not in str(err):
                raise
            return self._scan_from_now_on(path)  # its constructor refuses a container that reports 0 frames

    def _scan_from_now_on(self, path: str):
        """The container gave no frame count: from now on the library scans each video for it (slower)."""
        log.warning("%s: the container header gives no frame count; PyNvVideoCodec scans every video from now on "
                    "(need_scanned_stream_metadata)", path)
        self.scan_metadata = True
        return self._create(path)

    def _create(self, path: str):
        nvc = self._nvc
        self._decoder = nvc.SimpleDecoder(
            path, gpu_id=self.gpu_id, cuda_context=_primary_context(self.gpu_id),
            cuda_stream=self.stream.cuda_stream, use_device_memory=True,
            max_width=self.max_size[0], max_height=self.max_size[1],
            need_scanned_stream_metadata=self.scan_metadata, output_color_type=nvc.OutputColorType.RGB)
        self.decoders_created += 1
        return self._decoder

    def close(self) -> None:
        """Releases the SimpleDecoder in the calling (its own) thread, after its stream's work is done."""
        self.stream.synchronize()
        self._decoder = None


def _primary_context(gpu_id: int) -> int:
    """The device's primary CUDA context, which PyTorch uses too: the library checks that our stream belongs to the
    context it decodes in. 0 (let the library pick) when libcuda cannot be asked."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        device, context = ctypes.c_int(), ctypes.c_void_p()
        if cuda.cuDeviceGet(ctypes.byref(device), gpu_id) or \
                cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device):
            return 0
        return context.value or 0
    except OSError:
        return 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
