"""Does compile.py's own NVRTC call give the same machine code as the cupy.RawModule compile it
replaced? For a sample of forward and backward variants of both kernel families, compile each
through cupy.RawModule (options as compile.py passed them before) into an empty CuPy cache and
through compile.binary, and compare the machine code of the two cubins (their .text sections).
Prints one line per program and "identical: N of N" last. Needs a GPU (RawModule asks for one)."""
import os
import sys
import tempfile
from pathlib import Path

os.environ["CUPY_CACHE_DIR"] = tempfile.mkdtemp(prefix="cupy-cache-")
import cupy  # noqa: E402

from cuflash import compile as compile_, device, plan  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sass_diff import code_sections  # noqa: E402


def cupy_cubin(program, arch):
    """The cubin cupy.RawModule builds for `program`, read back from its (fresh) disk cache."""
    options = program.options + ((f"-arch={arch}",) if program.arch else ())
    before = set(Path(os.environ["CUPY_CACHE_DIR"]).iterdir())
    module = cupy.RawModule(code=program.source, options=options)
    module.get_function(program.names[0])
    new = max(set(Path(os.environ["CUPY_CACHE_DIR"]).iterdir()) - before, key=lambda p: p.stat().st_mtime)
    blob = new.read_bytes()
    return blob[blob.index(b"\x7fELF"):]


def main():
    capability = device.compute_capability(cupy.cuda.Device().id)
    forwards, backwards = plan.forward_variants(), plan.backward_variants()
    sample = ([compile_.forward_program(v) for v in forwards if v.head_dim in (64, 128) and v.dtype == "bfloat16"
               and not v.dropout][:6]
              + [compile_.backward_program(v) for v in backwards if v.head_dim in (64, 256) and v.dtype == "float16"
                 and not v.deterministic][:6])
    same = 0
    for program in sample:
        arch = compile_.arch_for(program, capability)
        ours, theirs = code_sections(compile_.binary(program, arch)), code_sections(cupy_cubin(program, arch))
        same += ours == theirs
        print(f"{program.file} {dict(program.defines)} {arch}: {'identical' if ours == theirs else 'DIFFERENT'} "
              f"({sum(map(len, ours.values()))} bytes of code in {len(ours)} kernels)", flush=True)
    print(f"identical: {same} of {len(sample)}")
    return 0 if same == len(sample) else 1


if __name__ == "__main__":
    sys.exit(main())
