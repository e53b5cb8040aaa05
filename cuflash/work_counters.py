"""The work counters of the persistent sm_90a forward, kept zeroed between launches.

Its grid claims units of work from an int32 in device memory that must be zero at launch.
Zeroing a fresh one per call costs a fill kernel and an allocation (~10 us of host time on
torch, a sixth of a tiny call). Instead each device keeps a ring of RING_SLOTS zeroed int32s: a
launch takes the next slot, and the kernel's last claim stores zero back into it
(cuda_src/tile_scheduler.cuh), so the slot is ready when its turn comes again, RING_SLOTS
launches later. Two grids would share a slot only if a launch were still queued or running
after RING_SLOTS later launches on the same device.

A launch captured into a CUDA graph may replay at any time, beside any eager launch, so it gets
no ring slot: take() returns 0 while the stream captures, and the caller zeroes a fresh counter
on the stream, which the graph then replays with its kernel.
"""
import itertools
import threading

RING_SLOTS = 1 << 16  # 256 KB of int32 per device

_rings = {}  # device id -> base pointer of its ring
_lock = threading.Lock()
_turns = itertools.count()  # next() is atomic under the GIL


def take(device_id, stream):
    """A zeroed counter's address on device_id (CuPy's current device) for a launch on
    `stream` (a raw CUDA stream), or 0 while the stream is capturing a graph."""
    from cupy.cuda import runtime

    if runtime.streamIsCapturing(stream):
        return 0
    base = _rings.get(device_id)
    if base is None:
        base = _ring(device_id)
    return base + 4 * (next(_turns) % RING_SLOTS)


def _ring(device_id):
    from cupy.cuda import runtime

    with _lock:
        if device_id not in _rings:
            # Raw memory, never freed: the kernels reach it after any pool is gone. The memset runs
            # on the legacy stream, which non-blocking streams do not wait for: hence the sync.
            base = runtime.malloc(4 * RING_SLOTS)
            runtime.memset(base, 0, 4 * RING_SLOTS)
            runtime.deviceSynchronize()
            _rings[device_id] = base
    return _rings[device_id]
