"""The math of steering: the ControlVector type, activation capture and fitting methods.

Never imports llama.cpp or the CLI. Modules that need torch import it themselves, so that
``from rs_local.vectors import ControlVector`` stays light.
"""

from rs_local.vectors.control_vector import ControlVector

__all__ = ["ControlVector"]
