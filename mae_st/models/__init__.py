"""Model zoo: the MAE-ST pretraining model, the video ViT classifier, their registry and pretrained-weight loading.

Importing this package registers every model factory (`mae_st.models.mae`, `mae_st.models.vit`).
"""

from mae_st.models.backbone import TokenCounts
from mae_st.models.mae import MaskedAutoencoderViT
from mae_st.models.pretrained import LoadReport, load_checkpoint_file, load_encoder_into_classifier
from mae_st.models.registry import build_model, create_model, list_models, model_family, register_model
from mae_st.models.vit import VisionTransformer

__all__ = [
    "LoadReport",
    "MaskedAutoencoderViT",
    "TokenCounts",
    "VisionTransformer",
    "build_model",
    "create_model",
    "list_models",
    "load_checkpoint_file",
    "load_encoder_into_classifier",
    "model_family",
    "register_model",
]
