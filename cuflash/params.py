"""The kernels' interface: the fields of each parameter struct of cuda_src/params.cuh, in order.

A kernel takes one struct (two for the sm_90a kernels: the struct and their TMA maps) by value.
The launchers fill it by field name (Layout.pack), laid out here by C's rules; compile.py appends
to every program the static_asserts of Layout.static_asserts, so that the compiler checks each
field's offset and kind, and the struct's size, against this description. A field that differs
on the two sides fails the build (and so the CPU tests) rather than a launch.

Kinds: P pointer, q int64, i int32, I uint32, f float32, s a 128-byte CUtensorMap (64-byte
aligned). A field's C path may cross nested structs ("drop.rng.seed_lo"); its Python name is
the last component, unique within a struct.
"""
import struct

_KINDS = {"P": ("Q", 8, "pointer"), "q": ("q", 8, "int64"), "i": ("i", 4, "int32"), "I": ("I", 4, "uint32"),
          "f": ("f", 4, "float32"), "s": ("128s", 64, "CUtensorMap")}


class Layout:
    """One parameter struct: its C name, and (C path, kind) per field, in declaration order."""

    def __init__(self, c_name, fields):
        self.c_name = c_name
        self.paths = tuple(path for path, _ in fields)
        self.kinds = tuple(kind for _, kind in fields)
        self.names = tuple(path.rsplit(".", 1)[-1] for path in self.paths)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{c_name}: field names are not unique: {self.names}")
        offsets, fmt, cursor = [], "<", 0
        for kind in self.kinds:
            code, align, _ = _KINDS[kind]
            offset = -(-cursor // align) * align
            fmt += f"{offset - cursor}x{code}" if offset > cursor else code
            offsets.append(offset)
            cursor = offset + struct.calcsize("<" + code)
        self.alignment = max(_KINDS[kind][1] for kind in self.kinds)
        self.size = -(-cursor // self.alignment) * self.alignment
        self.offsets = tuple(offsets)
        self._struct = struct.Struct(fmt + (f"{self.size - cursor}x" if self.size > cursor else ""))
        self._index = {name: i for i, name in enumerate(self.names)}

    def pack(self, values):
        """The struct's bytes from {field name: value}, which must name every field once."""
        if len(values) != len(self.names) or not all(name in self._index for name in values):
            missing = sorted(set(self.names) - set(values))
            unknown = sorted(set(values) - set(self.names))
            raise ValueError(f"{self.c_name}: missing fields {missing}, unknown fields {unknown}")
        return self._struct.pack(*[values[name] for name in self.names])

    def run(self, names):
        """(offset, struct.Struct) writing the consecutive fields `names` in place: Struct.pack_into(
        buffer, offset, *values) stores them into this struct's bytes (a launch's parameter buffer)."""
        first = self._index.get(names[0]) if names else None
        if first is None or tuple(names) != self.names[first:first + len(names)]:
            raise ValueError(f"{self.c_name}: {list(names)} are not consecutive fields of {self.names}")
        fmt, cursor = "<", self.offsets[first]
        for offset, kind in zip(self.offsets[first:first + len(names)], self.kinds[first:first + len(names)]):
            code = _KINDS[kind][0]
            fmt += (f"{offset - cursor}x" if offset > cursor else "") + code
            cursor = offset + struct.calcsize("<" + code)
        return self.offsets[first], struct.Struct(fmt)

    def static_asserts(self):
        """C++ static_asserts that hold iff cuda_src/params.cuh agrees with this description."""
        lines = []
        for path, kind, offset in zip(self.paths, self.kinds, self.offsets):
            member = f"static_cast<{self.c_name}*>(nullptr)->{path}"
            # __INTADDR__: EDG's constant address, where NVRTC 13.0 has no __builtin_offsetof.
            lines.append(f"static_assert(__INTADDR__(&(({self.c_name}*)0)->{path}) == {offset} && "
                         f"FieldKind<decltype({member})>::value == '{kind}', "
                         f"\"{self.c_name}.{path}: cuflash/params.py expects a {_KINDS[kind][2]} at byte {offset}\");")
        lines.append(f"static_assert(sizeof({self.c_name}) == {self.size}, "
                     f"\"{self.c_name}: cuflash/params.py expects {self.size} bytes\");")
        return "\n".join(lines)


def _strides(*arrays):
    return [(f"{a}_{axis}_stride", "q") for a in arrays for axis in ("batch", "row", "head")]


_DROPOUT = [("drop.rng.seed_lo", "I"), ("drop.rng.seed_hi", "I"), ("drop.rng.offset", "I"),
            ("drop.rng.threshold", "I"), ("drop.rp_dropout", "f")]

FWD = Layout("FwdParams", [
    ("q", "P"), ("k", "P"), ("v", "P"), ("o", "P"), ("lse", "P"), ("unit_counter", "P"),
    *_strides("q", "k", "v", "o"),
    ("seqlen_q", "i"), ("seqlen_k", "i"), ("num_heads", "i"), ("num_heads_k", "i"), ("head_dim", "i"),
    ("num_m_blocks", "i"), ("num_bh", "i"), ("tail_heads", "i"), ("scale_log2", "f"), *_DROPOUT, ("softcap_scale", "f")])

BWD = Layout("BwdParams", [
    ("q", "P"), ("k", "P"), ("v", "P"), ("o", "P"), ("dout", "P"), ("dq", "P"), ("dk", "P"), ("dv", "P"),
    ("lse", "P"), ("lse2", "P"), ("dsum", "P"), ("dq_accum", "P"), ("dq_done", "P"), ("dq_converted", "P"),
    ("dkdv_partial", "P"),
    *_strides("q", "k", "v", "o", "do", "dq", "dk", "dv"),
    ("seqlen_q", "i"), ("seqlen_q_pad", "i"), ("seqlen_k", "i"), ("num_heads", "i"), ("num_heads_k", "i"),
    ("head_dim", "i"), ("num_m_blocks", "i"), ("num_n_blocks", "i"), ("rows_total", "i"), ("num_dq_tiles", "i"),
    ("num_converters", "i"), ("flush_every", "i"), ("scale_log2", "f"), ("ds_scale", "f"), ("d_scale", "f"),
    *_DROPOUT, ("softcap_scale", "f")])

TMA_MAPS = Layout("TmaMaps", [("q", "s"), ("k", "s"), ("v", "s"), ("o_or_do", "s")])

MASK = Layout("MaskParams", [("mask", "P"), ("calls", "q"), ("seqlen_q", "i"), ("seqlen_k", "i"),
                             ("rng.seed_lo", "I"), ("rng.seed_hi", "I"), ("rng.offset", "I"), ("rng.threshold", "I")])

LAYOUTS = {layout.c_name: layout for layout in (FWD, BWD, TMA_MAPS, MASK)}


def strides(prefix, info):
    """{<prefix>_batch_stride: .., <prefix>_row_stride: .., <prefix>_head_stride: ..} of a
    (batch, seqlen, heads, d) array description."""
    batch, row, head = info.strides[:3]
    return {f"{prefix}_batch_stride": batch, f"{prefix}_row_stride": row, f"{prefix}_head_stride": head}
