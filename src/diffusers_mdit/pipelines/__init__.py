from .pipeline_diffit import DiffiTPipeline
from .pipeline_dit import DiTBaselinePipeline
from .pipeline_mdit import MDiTPipeline
from .pipeline_mdit_text2img import MDiTTextToImagePipeline

__all__ = ["DiTBaselinePipeline", "DiffiTPipeline", "MDiTPipeline", "MDiTTextToImagePipeline"]
