"""The `FrameDecoder` of `mae_st.data.clip_reader` on NVDEC through the driver's video API (libnvcuvid), by ctypes.

Why: with PyNvVideoCodec a reader thread's time is the frames decoded to reach a clip, ~0.12-0.15 ms each, and
one process levels off near 16-17 thousand decoded frames a second however many threads decode
(docs/performance.md, 2026-12-01): a finetuning clip at stride 4 decodes ~75 frames, so ~220 clips/s. The library
maps, converts and copies out every frame it decodes, waiting for each. Here the driver's parser and decoder are
driven directly: PyAV demuxes the packets from the keyframe before the clip, every packet is decoded (the
references need it), and only the frames asked for are mapped, copied out and converted to RGB. Passed-over frames
cost a decode submission and two short callbacks, no wait.

One decoder per reader thread, as `mae_st.data.nvdec.NvdecDecoder`: one NVDEC session per video size (created at
the first video of that size, then reused), one CUDA stream, the device's primary context (PyTorch's), so the
frames are ordinary CUDA tensors. Codecs: VP8, VP9 and AV1 packets go to the parser as demuxed; H.264 and HEVC
after FFmpeg's Annex B filter. 8-bit 4:2:0 only (what the packer writes); anything else raises, and the reader
counts the sample as bad.

The structures below follow the Video Codec SDK's `cuviddec.h` / `nvcuvid.h` (as in FFmpeg's nv-codec-headers);
their sizes and offsets were checked against those headers compiled with gcc on x86-64 Linux.
"""

from __future__ import annotations

import ctypes as C
import functools
import itertools
import time
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

import av
import torch

CODECS = {"vp8": 9, "vp9": 10, "av1": 11, "h264": 4, "hevc": 8}  # cudaVideoCodec
ANNEX_B_FILTERS = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}
CHROMA_420, SURFACE_NV12, DEINTERLACE_WEAVE, CREATE_PREFER_CUVID = 1, 0, 0, 4
PKT_ENDOFSTREAM, PKT_TIMESTAMP = 0x01, 0x02
MEMORYTYPE_DEVICE = 2
DECODE_SURFACES = 16  # at least the parser's minimum (VP9: 8 references + 1); a few spare keep NVDEC busy
MAPPED_AT_ONCE = 8  # frames mapped before one stream wait frees them all (the decoder's output surfaces)


# ---- the driver's structures ----------------------------------------------------------------------------------


class _Rect16(C.Structure):
    _fields_ = [("left", C.c_short), ("top", C.c_short), ("right", C.c_short), ("bottom", C.c_short)]


class VideoFormat(C.Structure):  # CUVIDEOFORMAT
    _fields_ = [("codec", C.c_int), ("frame_rate_num", C.c_uint), ("frame_rate_den", C.c_uint),
                ("progressive_sequence", C.c_ubyte), ("bit_depth_luma_minus8", C.c_ubyte),
                ("bit_depth_chroma_minus8", C.c_ubyte), ("min_num_decode_surfaces", C.c_ubyte),
                ("coded_width", C.c_uint), ("coded_height", C.c_uint),
                ("display_left", C.c_int), ("display_top", C.c_int), ("display_right", C.c_int),
                ("display_bottom", C.c_int), ("chroma_format", C.c_int), ("bitrate", C.c_uint),
                ("aspect_x", C.c_int), ("aspect_y", C.c_int),
                ("video_format_range", C.c_ubyte),  # bits 0-2 video_format, bit 3 video_full_range_flag
                ("color_primaries", C.c_ubyte), ("transfer_characteristics", C.c_ubyte),
                ("matrix_coefficients", C.c_ubyte), ("seqhdr_data_length", C.c_uint)]


class DisplayInfo(C.Structure):  # CUVIDPARSERDISPINFO
    _fields_ = [("picture_index", C.c_int), ("progressive_frame", C.c_int), ("top_field_first", C.c_int),
                ("repeat_first_field", C.c_int), ("timestamp", C.c_longlong)]


SequenceCallback = C.CFUNCTYPE(C.c_int, C.c_void_p, C.POINTER(VideoFormat))
DecodeCallback = C.CFUNCTYPE(C.c_int, C.c_void_p, C.c_void_p)  # CUVIDPICPARAMS*, passed through untouched
DisplayCallback = C.CFUNCTYPE(C.c_int, C.c_void_p, C.POINTER(DisplayInfo))


class ParserParams(C.Structure):  # CUVIDPARSERPARAMS
    _fields_ = [("CodecType", C.c_int), ("ulMaxNumDecodeSurfaces", C.c_uint), ("ulClockRate", C.c_uint),
                ("ulErrorThreshold", C.c_uint), ("ulMaxDisplayDelay", C.c_uint), ("bitfields", C.c_uint),
                ("uReserved1", C.c_uint * 4), ("pUserData", C.c_void_p),
                ("pfnSequenceCallback", SequenceCallback), ("pfnDecodePicture", DecodeCallback),
                ("pfnDisplayPicture", DisplayCallback), ("pfnGetOperatingPoint", C.c_void_p),
                ("pfnGetSEIMsg", C.c_void_p), ("pvReserved2", C.c_void_p * 5), ("pExtVideoInfo", C.c_void_p)]


class DecoderCreateInfo(C.Structure):  # CUVIDDECODECREATEINFO ("unsigned long" fields: 8 bytes on Linux)
    _fields_ = [("ulWidth", C.c_ulong), ("ulHeight", C.c_ulong), ("ulNumDecodeSurfaces", C.c_ulong),
                ("CodecType", C.c_int), ("ChromaFormat", C.c_int), ("ulCreationFlags", C.c_ulong),
                ("bitDepthMinus8", C.c_ulong), ("ulIntraDecodeOnly", C.c_ulong), ("ulMaxWidth", C.c_ulong),
                ("ulMaxHeight", C.c_ulong), ("Reserved1", C.c_ulong), ("display_area", _Rect16),
                ("OutputFormat", C.c_int), ("DeinterlaceMode", C.c_int), ("ulTargetWidth", C.c_ulong),
                ("ulTargetHeight", C.c_ulong), ("ulNumOutputSurfaces", C.c_ulong), ("vidLock", C.c_void_p),
                ("target_rect", _Rect16), ("enableHistogram", C.c_ulong), ("Reserved2", C.c_ulong * 4)]


class ProcParams(C.Structure):  # CUVIDPROCPARAMS
    _fields_ = [("progressive_frame", C.c_int), ("second_field", C.c_int), ("top_field_first", C.c_int),
                ("unpaired_field", C.c_int), ("reserved_flags", C.c_uint), ("reserved_zero", C.c_uint),
                ("raw_input_dptr", C.c_ulonglong), ("raw_input_pitch", C.c_uint), ("raw_input_format", C.c_uint),
                ("raw_output_dptr", C.c_ulonglong), ("raw_output_pitch", C.c_uint), ("Reserved1", C.c_uint),
                ("output_stream", C.c_void_p), ("Reserved", C.c_uint * 46), ("histogram_dptr", C.c_void_p),
                ("Reserved2", C.c_void_p * 1)]


class SourcePacket(C.Structure):  # CUVIDSOURCEDATAPACKET
    _fields_ = [("flags", C.c_ulong), ("payload_size", C.c_ulong), ("payload", C.c_char_p),
                ("timestamp", C.c_longlong)]


class Memcpy2D(C.Structure):  # CUDA_MEMCPY2D
    _fields_ = [("srcXInBytes", C.c_size_t), ("srcY", C.c_size_t), ("srcMemoryType", C.c_int),
                ("srcHost", C.c_void_p), ("srcDevice", C.c_ulonglong), ("srcArray", C.c_void_p),
                ("srcPitch", C.c_size_t), ("dstXInBytes", C.c_size_t), ("dstY", C.c_size_t),
                ("dstMemoryType", C.c_int), ("dstHost", C.c_void_p), ("dstDevice", C.c_ulonglong),
                ("dstArray", C.c_void_p), ("dstPitch", C.c_size_t), ("WidthInBytes", C.c_size_t),
                ("Height", C.c_size_t)]


STRUCTS = (VideoFormat, DisplayInfo, ParserParams, DecoderCreateInfo, ProcParams, SourcePacket, Memcpy2D)


@functools.lru_cache(maxsize=None)
def _libraries() -> Tuple[C.CDLL, C.CDLL]:
    """(libcuda, libnvcuvid) with the signatures used here; OSError on a machine without the driver's libraries."""
    cuda, cuvid = C.CDLL("libcuda.so.1"), C.CDLL("libnvcuvid.so.1")
    vp, pp = C.c_void_p, C.POINTER(C.c_void_p)
    cuvid.cuvidCreateVideoParser.argtypes = [pp, C.POINTER(ParserParams)]
    cuvid.cuvidParseVideoData.argtypes = [vp, C.POINTER(SourcePacket)]
    cuvid.cuvidDestroyVideoParser.argtypes = [vp]
    cuvid.cuvidCreateDecoder.argtypes = [pp, C.POINTER(DecoderCreateInfo)]
    cuvid.cuvidDestroyDecoder.argtypes = [vp]
    cuvid.cuvidDecodePicture.argtypes = [vp, vp]
    cuvid.cuvidMapVideoFrame64.argtypes = [vp, C.c_int, C.POINTER(C.c_ulonglong), C.POINTER(C.c_uint),
                                           C.POINTER(ProcParams)]
    cuvid.cuvidUnmapVideoFrame64.argtypes = [vp, C.c_ulonglong]
    cuda.cuDeviceGet.argtypes = [C.POINTER(C.c_int), C.c_int]
    cuda.cuDevicePrimaryCtxRetain.argtypes = [pp, C.c_int]
    cuda.cuCtxGetCurrent.argtypes = [pp]
    cuda.cuCtxSetCurrent.argtypes = [vp]
    cuda.cuMemcpy2DAsync_v2.argtypes = [C.POINTER(Memcpy2D), vp]
    return cuda, cuvid


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"{call} failed with CUresult {status}")


@functools.lru_cache(maxsize=None)
def cuvid_unavailable_reason() -> Optional[str]:
    """None when the driver's video decoder can be driven here (a CUDA GPU, libcuda and libnvcuvid), else why."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
    try:
        _libraries()
    except OSError as err:
        return f"the driver's video library cannot be loaded ({err}); the container needs " \
               "NVIDIA_DRIVER_CAPABILITIES including video"
    return None


class _FrameMapper:
    """Copies mapped frames out of the decoder's output surfaces into a clip's NV12 buffer (one 2D copy a frame, on
    the decoder's stream, no Python tensor per frame); the maps are released in groups after one stream wait."""

    def __init__(self, decoder: "CuvidDecoder", session: C.c_void_p, n: int, height: int, width: int):
        self.decoder, self.session = decoder, session
        self.height, self.width = height, width
        self.chroma_row = height + (height & 1)  # where a surface's interleaved UV rows start
        self.row_bytes = 2 * ((width + 1) // 2)
        rows = self.chroma_row + (height + 1) // 2
        self.nv12 = torch.empty((n, rows, self.row_bytes), dtype=torch.uint8, device=decoder.device)
        self.copy_params = Memcpy2D(srcMemoryType=MEMORYTYPE_DEVICE, dstMemoryType=MEMORYTYPE_DEVICE,
                                    dstPitch=self.row_bytes, WidthInBytes=self.row_bytes, Height=rows)
        self.mapped: List[int] = []

    def copy(self, picture: int, progressive: int, top_field_first: int, slots: Sequence[int]) -> None:
        d, params = self.decoder, self.copy_params
        proc = ProcParams(progressive_frame=progressive, top_field_first=top_field_first,
                          output_stream=d.stream.cuda_stream)
        pointer, pitch = C.c_ulonglong(), C.c_uint()
        started = time.perf_counter()
        _check(d.cuvid.cuvidMapVideoFrame64(self.session, picture, C.byref(pointer), C.byref(pitch),
                                            C.byref(proc)), "cuvidMapVideoFrame64")
        d.seconds["map"] += time.perf_counter() - started
        self.mapped.append(pointer.value)
        params.srcDevice, params.srcPitch = pointer.value, pitch.value
        base, frame_bytes = self.nv12.data_ptr(), self.nv12[0].numel()
        for slot in slots:
            params.dstDevice = base + slot * frame_bytes
            _check(d.cuda.cuMemcpy2DAsync_v2(C.byref(params), d.stream.cuda_stream), "cuMemcpy2DAsync")
        if len(self.mapped) >= MAPPED_AT_ONCE:
            self.release()

    def release(self) -> None:
        if self.mapped:
            started = time.perf_counter()
            self.decoder.stream.synchronize()  # the copies out of these surfaces are done
            self.decoder.seconds["wait"] += time.perf_counter() - started
            for pointer in self.mapped:
                _check(self.decoder.cuvid.cuvidUnmapVideoFrame64(self.session, pointer), "cuvidUnmapVideoFrame64")
            self.mapped.clear()

    def rgb(self, matrix) -> torch.Tensor:
        luma = self.nv12[:, :self.height, :self.width]
        chroma = self.nv12[:, self.chroma_row:]
        return _nv12_to_rgb(luma, chroma, matrix)


class CuvidDecoder:
    """Decodes chosen frames of a video file to a (len(indices), H, W, 3) uint8 CUDA tensor. One per reader thread:
    NVDEC sessions created once per video size, one CUDA stream, a new (CPU-side) parser per video."""

    def __init__(self, gpu_id: int = 0):
        reason = cuvid_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"NVDEC decoding is unavailable: {reason}")
        self.cuda, self.cuvid = _libraries()
        self.gpu_id = gpu_id
        self.device = torch.device("cuda", gpu_id)
        self.stream = torch.cuda.Stream(device=self.device)
        self.display_delay = 0  # the parser's ulMaxDisplayDelay (0: each frame displayed as soon as decoded)
        device, context = C.c_int(), C.c_void_p()
        _check(self.cuda.cuDeviceGet(C.byref(device), gpu_id), "cuDeviceGet")
        _check(self.cuda.cuDevicePrimaryCtxRetain(C.byref(context), device), "cuDevicePrimaryCtxRetain")
        self.context = context
        self._sessions: Dict[Tuple[int, int, int], C.c_void_p] = {}  # (codec, width, height) -> decoder
        self.videos = 0  # decode calls (one per video)
        self.frames = 0  # distinct frames handed out
        self.decoded = 0  # frames decoded, passed over or handed out
        self.decoders_created = 0
        # seconds this thread spent per phase (benchmarks read them: where a decoder thread's time goes)
        self.seconds = {"demux": 0.0, "parse": 0.0, "decode call": 0.0, "map": 0.0, "wait": 0.0, "convert": 0.0}

    # -- one video ---------------------------------------------------------------------------------------------

    def decode(self, path: str, frame_indices: Sequence[int]) -> torch.Tensor:
        """Frames `frame_indices` (any order, repeats allowed) of `path`, each distinct frame decoded once; an index
        past the video's last frame gives the last frame. Raises on a file this decoder cannot read."""
        self.videos += 1
        wanted = [max(int(i), 0) for i in frame_indices]
        if not wanted:
            raise ValueError("no frame indices requested")
        self._make_context_current()
        try:
            return self._decode(path, wanted)
        except BaseException:
            self.close()  # a session that saw a broken stream is not reused
            raise

    def _decode(self, path: str, wanted: List[int]) -> torch.Tensor:
        with av.open(path) as container:
            stream = container.streams.video[0]
            codec = CODECS.get(stream.codec_context.name)
            if codec is None:
                raise ValueError(f"{path}: codec {stream.codec_context.name!r} is not decoded on NVDEC here "
                                 f"(supported: {', '.join(CODECS)})")
            with torch.cuda.stream(self.stream):
                frames = _VideoRun(self, codec, stream).decode(container, wanted, path)
        self.stream.synchronize()  # the frames are complete for any stream and thread that receives them
        return frames

    def _make_context_current(self) -> None:
        current = C.c_void_p()
        _check(self.cuda.cuCtxGetCurrent(C.byref(current)), "cuCtxGetCurrent")
        if current.value != self.context.value:
            _check(self.cuda.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def session(self, fmt: VideoFormat) -> C.c_void_p:
        """The NVDEC session for this format's codec and size, created at its first video."""
        width = fmt.display_right - fmt.display_left
        height = fmt.display_bottom - fmt.display_top
        key = (fmt.codec, fmt.coded_width, fmt.coded_height, width, height)
        if key not in self._sessions:
            info = DecoderCreateInfo(
                ulWidth=fmt.coded_width, ulHeight=fmt.coded_height, ulMaxWidth=fmt.coded_width,
                ulMaxHeight=fmt.coded_height, ulNumDecodeSurfaces=max(DECODE_SURFACES, fmt.min_num_decode_surfaces),
                CodecType=fmt.codec, ChromaFormat=fmt.chroma_format, ulCreationFlags=CREATE_PREFER_CUVID,
                bitDepthMinus8=fmt.bit_depth_luma_minus8, OutputFormat=SURFACE_NV12,
                DeinterlaceMode=DEINTERLACE_WEAVE, ulTargetWidth=width, ulTargetHeight=height,
                ulNumOutputSurfaces=MAPPED_AT_ONCE,
                display_area=_Rect16(fmt.display_left, fmt.display_top, fmt.display_right, fmt.display_bottom))
            session = C.c_void_p()
            _check(self.cuvid.cuvidCreateDecoder(C.byref(session), C.byref(info)), "cuvidCreateDecoder")
            self._sessions[key] = session
            self.decoders_created += 1
        return self._sessions[key]

    def close(self) -> None:
        """Releases the NVDEC sessions in the calling (its own) thread, after its stream's work is done."""
        self.stream.synchronize()
        if self._sessions:
            self._make_context_current()
        for session in self._sessions.values():
            self.cuvid.cuvidDestroyDecoder(session)
        self._sessions.clear()


class _VideoRun:
    """One video through a new parser: packets from the keyframe before the first wanted frame, each frame's
    index carried as the packet's timestamp, the wanted ones copied out as they are displayed."""

    def __init__(self, decoder: CuvidDecoder, codec: int, stream):
        self.decoder, self.codec, self.stream = decoder, codec, stream
        self.error: Optional[BaseException] = None
        self.session: Optional[C.c_void_p] = None
        self.mapper: Optional[_FrameMapper] = None
        self.size: Optional[Tuple[int, int]] = None
        self.slots: Dict[int, List[int]] = {}
        self.last_displayed: Optional[Tuple[int, int, int, int]] = None  # (index, picture, progressive, tff)
        self.matrix = None

    def decode(self, container, wanted: List[int], path: str) -> torch.Tensor:
        for slot, index in enumerate(wanted):
            self.slots.setdefault(index, []).append(slot)
        self.n = len(wanted)
        cuvid = self.decoder.cuvid
        callbacks = (SequenceCallback(self._on_sequence), DecodeCallback(self._on_decode),
                     DisplayCallback(self._on_display))  # kept alive while the parser lives
        params = ParserParams(CodecType=self.codec, ulMaxNumDecodeSurfaces=DECODE_SURFACES, ulClockRate=0,
                              ulErrorThreshold=0, ulMaxDisplayDelay=self.decoder.display_delay,
                              pfnSequenceCallback=callbacks[0], pfnDecodePicture=callbacks[1],
                              pfnDisplayPicture=callbacks[2])
        parser = C.c_void_p()
        _check(cuvid.cuvidCreateVideoParser(C.byref(parser), C.byref(params)), "cuvidCreateVideoParser")
        try:
            self._feed(parser, container, max(self.slots), path)
            if self.mapper is None or self.last_displayed is None:
                raise RuntimeError(f"{path}: no frame was decoded")
            missing = [i for i in self.slots if i > self.last_displayed[0]]
            if missing:  # past the real end: the last frame, as the other decoders give
                _, picture, progressive, tff = self.last_displayed
                self.mapper.release()  # it may be mapped already (when it was asked for too)
                self.mapper.copy(picture, progressive, tff, [s for i in missing for s in self.slots[i]])
        finally:
            if self.mapper is not None:
                self.mapper.release()
            cuvid.cuvidDestroyVideoParser(parser)
        self.decoder.frames += len(self.slots)
        started = time.perf_counter()
        frames = self.mapper.rgb(self.matrix)
        self.decoder.stream.synchronize()
        self.decoder.seconds["convert"] += time.perf_counter() - started
        return frames

    def _feed(self, parser, container, last_wanted: int, path: str) -> None:
        cuvid, seconds = self.decoder.cuvid, self.decoder.seconds
        clock = time.perf_counter()
        for index, payload in self._packets(container, min(self.slots)):
            packet = SourcePacket(flags=PKT_TIMESTAMP, payload_size=len(payload), payload=payload, timestamp=index)
            parsing = time.perf_counter()
            seconds["demux"] += parsing - clock
            status = cuvid.cuvidParseVideoData(parser, C.byref(packet))
            clock = time.perf_counter()
            seconds["parse"] += clock - parsing
            self._raise_if_failed(status, path)
            if self.last_displayed is not None and self.last_displayed[0] >= last_wanted:
                return
        status = cuvid.cuvidParseVideoData(parser, C.byref(SourcePacket(flags=PKT_ENDOFSTREAM)))
        self._raise_if_failed(status, path)

    def _raise_if_failed(self, status: int, path: str) -> None:
        if self.error is not None:
            raise self.error
        if status != 0:
            raise RuntimeError(f"{path}: cuvidParseVideoData failed with CUresult {status}")

    def _packets(self, container, first_wanted: int):
        """(frame index, payload bytes) from the keyframe at or before `first_wanted` (or the start)."""
        stream = self.stream
        rate, start = stream.average_rate or stream.guessed_rate, stream.start_time or 0
        index = 0
        if first_wanted > 0 and rate and stream.time_base is not None:
            try:
                container.seek(start + int(Fraction(first_wanted) / Fraction(rate) / stream.time_base),
                               stream=stream, backward=True, any_frame=False)
            except Exception:  # noqa: BLE001 - av.error.FFmpegError: decode from the start instead
                container.seek(0)
        name = stream.codec_context.name
        packets = container.demux(stream)
        if name in ANNEX_B_FILTERS:
            from av.bitstream import BitStreamFilterContext

            annex_b = BitStreamFilterContext(ANNEX_B_FILTERS[name], stream)
            packets = itertools.chain.from_iterable(annex_b.filter(p) for p in packets)
        seen_keyframe = False
        for packet in packets:
            if packet.size == 0:
                continue
            if not seen_keyframe:
                if not packet.is_keyframe:
                    continue
                seen_keyframe = True
                if packet.pts is not None and rate:
                    index = round(float((packet.pts - start) * stream.time_base * rate))
            yield index, bytes(packet)
            index += 1

    # -- parser callbacks (in this thread, inside cuvidParseVideoData) -----------------------------------------

    def _on_sequence(self, _user, fmt_pointer) -> int:
        try:
            fmt = fmt_pointer.contents
            if fmt.chroma_format != CHROMA_420 or fmt.bit_depth_luma_minus8 != 0:
                raise ValueError(f"only 8-bit 4:2:0 video is decoded on NVDEC here (chroma format "
                                 f"{fmt.chroma_format}, bit depth {8 + fmt.bit_depth_luma_minus8})")
            size = (fmt.display_bottom - fmt.display_top, fmt.display_right - fmt.display_left)
            if self.size is not None and size != self.size:
                raise ValueError(f"the frame size changes within the video ({self.size} -> {size})")
            self.session = self.decoder.session(fmt)
            if self.mapper is None:
                self.size = size
                self.mapper = _FrameMapper(self.decoder, self.session, self.n, *size)
                self.matrix = _color_matrix(fmt.matrix_coefficients, bool(fmt.video_format_range & 0x08))
            return max(DECODE_SURFACES, fmt.min_num_decode_surfaces)
        except BaseException as err:  # noqa: BLE001 - raised again by the caller, outside the driver
            self.error = err
            return 0

    def _on_decode(self, _user, picture_params) -> int:
        started = time.perf_counter()
        status = self.decoder.cuvid.cuvidDecodePicture(self.session, picture_params)
        self.decoder.seconds["decode call"] += time.perf_counter() - started
        if status != 0:
            self.error = RuntimeError(f"cuvidDecodePicture failed with CUresult {status}")
            return 0
        self.decoder.decoded += 1
        return 1

    def _on_display(self, _user, info_pointer) -> int:
        try:
            info = info_pointer.contents
            index = int(info.timestamp)
            self.last_displayed = (index, info.picture_index, info.progressive_frame, info.top_field_first)
            slots = self.slots.get(index)
            if slots:
                self.mapper.copy(info.picture_index, info.progressive_frame, info.top_field_first, slots)
            return 1
        except BaseException as err:  # noqa: BLE001
            self.error = err
            return 0


# ---- NV12 to RGB ----------------------------------------------------------------------------------------------


def _color_matrix(matrix_coefficients: int, full_range: bool) -> Tuple[float, float, float, float, bool]:
    """(Kr-derived coefficients) for BT.709 when the stream says so (1), else BT.601, as FFmpeg assumes for
    standard-definition video without a tag: (r_v, g_u, g_v, b_u, full_range)."""
    if matrix_coefficients == 1:
        return 1.5748, -0.1873, -0.4681, 1.8556, full_range
    return 1.402, -0.344136, -0.714136, 1.772, full_range


def _nv12_to_rgb(luma: torch.Tensor, chroma: torch.Tensor, matrix, chunk: int = 32) -> torch.Tensor:
    """(N, H, W) luma and (N, ceil(H/2), 2*ceil(W/2)) interleaved UV to (N, H, W, 3) uint8 RGB, `chunk` frames at
    a time (the float intermediates of a pretraining video's ~180 frames would be ~0.3 GB at 342x256)."""
    r_v, g_u, g_v, b_u, full_range = matrix
    n, height, width = luma.shape
    out = torch.empty((n, height, width, 3), dtype=torch.uint8, device=luma.device)
    for start in range(0, n, chunk):
        y = luma[start:start + chunk].float()
        uv = chroma[start:start + chunk].unflatten(-1, (-1, 2)).float() - 128.0
        uv = uv.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)[:, :height, :width]
        u, v = uv[..., 0], uv[..., 1]
        if not full_range:
            y = (y - 16.0) * (255.0 / 219.0)
            u, v = u * (255.0 / 224.0), v * (255.0 / 224.0)
        rgb = torch.stack((y + r_v * v, y + g_u * u + g_v * v, y + b_u * u), dim=-1)
        out[start:start + chunk] = rgb.round_().clamp_(0, 255)
    return out
