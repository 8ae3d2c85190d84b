"""Drop the 11.x/12.x targets from vLLM's FP4 and scaled-mm CUTLASS kernels.

The seed's MXFP4 image (christopherowen/vllm-dgx-spark:v12) made the same
change with `sed` on CMakeLists.txt, equivalent to the Avarok image's
vllm_cmakelists.patch: the FP4_ARCHS and SCALED_MM_ARCHS target lists keep
only their 10.x entries, so these kernels are not compiled for SM110/SM120/
SM121 (where their compilation failed for GB10 builds of that period; GB10 then
uses the fork's MXFP4 paths instead).

Unlike a blind sed, this fails the build when it changes nothing, so a vLLM
ref whose CMakeLists.txt no longer has these lines is noticed.

Usage: python3 narrow_sm12x_archs.py CMakeLists.txt
"""

import re
import sys

CALL = re.compile(
    r'(cuda_archs_loose_intersection\(\s*(?:FP4_ARCHS|SCALED_MM_ARCHS)\s+")([^"]*)(")'
)


def narrow(match: re.Match) -> str:
    kept = [a for a in match.group(2).split(";") if a and not a.startswith(("11.", "12."))]
    return match.group(1) + ";".join(kept) + match.group(3)


def main(path: str) -> int:
    text = open(path, encoding="utf-8").read()
    changes = [(m.group(0), narrow(m)) for m in CALL.finditer(text)]
    changes = [(old, new) for old, new in changes if old != new]
    if not changes:
        print(f"{path}: no FP4_ARCHS/SCALED_MM_ARCHS list with 11.x/12.x targets found", file=sys.stderr)
        return 1
    for old, new in changes:
        print(f"{old}  ->  {new}")
    open(path, "w", encoding="utf-8").write(CALL.sub(narrow, text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
