"""SPIR-V: a reader, slot reasoning and the race check. Imports no JAX and nothing of the compiler.

Used by export on every SPIR-V build, and by the deployment side (``nnx-metal check``,
``compile.find_races``) on the kernels an artifact ships in ``spirv/``.
"""

from ._hazards import Race as Race
from ._hazards import find_races as find_races
from ._reader import SpirvError as SpirvError
