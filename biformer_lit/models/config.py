"""BiFormerKwargs: the BiFormer settings a training config may give (`model.model_kwargs`), typed, so the command
line's parser refuses a misspelt key or a wrong type before anything is built. Values are checked by the
model's constructor (their one home). Left out: what the data decides (num_classes, img_size, in_chans: the
data is RGB), the recipe's stochastic depth (model.drop_path) and timm's switches that make no classifier
to train (pretrained: weights come from --model.init_from; features_only)."""
from typing import List, Optional, Union

try:  # Python 3.11
    from typing import TypedDict
except ImportError:  # Python 3.10
    from typing_extensions import TypedDict

PerStageInt = Union[int, List[int]]


class BiFormerKwargs(TypedDict, total=False):
    """A scalar (every stage) or one value per stage; see biformer_lit.models.BiFormer."""
    depths: PerStageInt
    embed_dims: PerStageInt
    attn: Union[str, List[str]]
    topks: PerStageInt
    n_wins: PerStageInt
    head_dim: int
    num_heads: Union[None, int, List[Optional[int]]]
    mlp_ratios: Union[float, List[float]]
    qkv_bias: Union[bool, List[bool]]
    lepe_kernel: PerStageInt
    lepe_source: Union[str, List[str]]
    scale_mode: Union[str, List[str]]
    stripe_widths: Union[None, int, List[Optional[int]]]
    attn_backend: str
    stem: str
    pos_embed: bool
    drop_rate: float
    global_pool: str


NOT_SETTINGS = ("num_classes", "in_chans", "img_size", "drop_path_rate")  # BiFormer's, set by the module / data
