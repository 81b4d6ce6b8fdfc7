"""Which memory a compiled TPU program's bytes move through, read off its HLO text.

`compiled.cost_analysis()["bytes accessed"]` adds up the operand and output bytes of every
instruction wherever those buffers live. After memory-space assignment many of them live in the
TPU core's on-chip vector memory (VMEM): the compiler prefetches tensors into it with async
slices and copies and runs fusions on them there. Such bytes never touch HBM, yet cost analysis
counts them, and counts the prefetch's write too. The layout of every buffer in `as_text()` says
where it lives: `S(1)` is the alternate (on-chip) memory space, no `S(n)` is HBM, other spaces
hold scalars and sync flags.

`traffic(hlo_text)` splits the same sum, over the instructions of the entry computation, by
memory space: what moves to or from HBM and what stays on chip. Like cost analysis it reads
each operand and output once per instruction (reuse inside a fusion is not modelled), so the
HBM figure is an estimate of the step's HBM traffic, not a timing. The bodies of `while` loops
are not counted (their trip counts are not in the text); `traffic` says how many there are. The
train step's are scalar random draws.
"""
from __future__ import annotations

import collections
import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8}
HBM, ON_CHIP, OTHER = 0, 1, "other"   # memory spaces: 0 default (HBM), 1 alternate (VMEM)
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
# Bookkeeping that moves nothing: tuples, views, and async completions (counted at their start).
_FREE = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id")


def arrays(shape_text: str) -> list[tuple[int, int | str]]:
  """`(bytes, memory space)` of every array in an HLO shape (a tuple has several)."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape_text):
    n = DTYPE_BYTES[dtype]
    for d in filter(None, dims.split(",")):
      n *= int(d)
    space = re.search(r"S\((\d+)\)", layout or "")
    space = int(space.group(1)) if space else HBM
    out.append((n, space if space in (HBM, ON_CHIP) else OTHER))
  return out


def entry_instructions(hlo_text: str) -> list[tuple[str, str, str, list[str]]]:
  """`(name, shape, opcode, operand names)` of each instruction of the ENTRY computation."""
  lines = hlo_text.splitlines()
  start = next((i for i, line in enumerate(lines) if line.startswith("ENTRY")), None)
  if start is None:
    raise ValueError("No ENTRY computation in this HLO text: pass compiled.as_text() of a whole program.")
  out = []
  for line in lines[start + 1:]:
    if line.startswith("}"):
      break
    m = _INSTR.match(line.strip())
    if m:
      name, shape, op, rest = m.groups()
      out.append((name, shape, op, re.findall(r"%([\w.\-]+)", rest.split("), ")[0])))
  return out


def traffic(hlo_text: str) -> dict:
  """Bytes each memory space moves in the program's entry computation.

  Returns `{"hbm_bytes", "on_chip_bytes", "other_bytes", "hbm_bytes_by_op", "while_loops"}`.
  An async copy or slice (`*-start`) counts the array it moves once at its source and once at
  its destination, each in its own memory space (a prefetch into VMEM is one HBM read); every
  other instruction counts its outputs and each operand's whole array.
  """
  instrs = entry_instructions(hlo_text)
  shapes = {name: shape for name, shape, _, _ in instrs}
  totals = collections.Counter()
  hbm_by_op = collections.Counter()

  def add(op, nbytes, space):
    totals[space] += nbytes
    if space == HBM:
      hbm_by_op[op] += nbytes

  for _, shape, op, operands in instrs:
    if op in _FREE or op.endswith("-done"):
      continue
    if op in ("copy-start", "slice-start"):
      # Output: copy-start (destination, source, context), slice-start ((source), destination,
      # context). The moved array is read in one space and written in the other, once each; its
      # size is the second array's (a slice's source is larger than what moves).
      (_, first_space), (nbytes, second_space) = arrays(shape)[:2]
      add(op, nbytes, first_space)
      add(op, nbytes, second_space)
      continue
    for nbytes, space in arrays(shape):
      add(op, nbytes, space)
    for operand in operands:
      for nbytes, space in arrays(shapes.get(operand, "")):
        add(op, nbytes, space)
  return {"hbm_bytes": totals[HBM], "on_chip_bytes": totals[ON_CHIP], "other_bytes": totals[OTHER],
          "hbm_bytes_by_op": dict(hbm_by_op.most_common()),
          "while_loops": sum(op == "while" for _, _, op, _ in instrs)}
