from .pipeline_diffit import DiffiTPipeline
from .pipeline_mdit import MDiTPipeline
from .pipeline_mdit_text2img import MDiTTextToImagePipeline

__all__ = ["DiffiTPipeline", "MDiTPipeline", "MDiTTextToImagePipeline"]
