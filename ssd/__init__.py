"""ssd: speculative speculative decoding (Saguaro) inference engine."""
from ssd.engine.llm import LLM
from ssd.engine.sequence import RequestOutput
from ssd.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
