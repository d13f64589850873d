"""mae_st: data-pipeline-first trainer for spatiotemporal masked autoencoders (MAE-ST) on video."""

__version__ = "0.1.0"
