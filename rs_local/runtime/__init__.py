"""llama.cpp runtime: load GGUF models, apply control vectors, generate and chat.

Never imports torch or transformers: a user who only chats with a ready vector needs neither.
"""

from rs_local.runtime.runner import Generation, Runner, TokenEvent
from rs_local.runtime.sampling import SamplingParams

__all__ = ["Generation", "Runner", "SamplingParams", "TokenEvent"]
