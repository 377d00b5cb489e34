"""The NNX model zoo of nnx-metal: the models of the Flax NNX basics guide, modern API."""

from compile.runtime import register_variable_type as _register

from ._catalog import CATALOG as CATALOG
from ._catalog import CatalogEntry as CatalogEntry
from ._gpt import GPT as GPT
from ._gpt import GenerationError as GenerationError
from ._gpt import GPTConfig as GPTConfig
from ._gpt import decode_loop as decode_loop
from ._gpt import generate as generate
from ._gpt import generate_on as generate_on
from ._gpt import generation_functions as generation_functions
from ._gpt import pad_prompt as pad_prompt
from ._linear import Count as Count
from ._linear import Counter as Counter
from ._linear import Linear as Linear
from ._linear import StatefulLinear as StatefulLinear
from ._linen import CNN as CNN
from ._linen import BiasAdderWithRunningMean as BiasAdderWithRunningMean
from ._linen import ExplicitMLP as ExplicitMLP
from ._linen import SimpleDense as SimpleDense
from ._linen import SimpleMLP as SimpleMLP
from ._linen import linen_variables as linen_variables
from ._linen import to_nnx as to_nnx
from ._lora import LoraLinear as LoraLinear
from ._lora import LoraParam as LoraParam
from ._lora import lora as lora
from ._lora import merge_lora as merge_lora
from ._mlp import MLP as MLP
from ._mlp import StackedMLP as StackedMLP
from ._quantize import QuantizationError as QuantizationError
from ._quantize import QuantizedEmbed as QuantizedEmbed
from ._quantize import QuantizedLinear as QuantizedLinear
from ._quantize import QuantizedParam as QuantizedParam
from ._quantize import dequantize as dequantize
from ._quantize import quantize as quantize
from ._realistic import REALISTIC as REALISTIC
from ._realistic import RealisticEntry as RealisticEntry
from ._regression import LinearRegression as LinearRegression
from ._regression import make_regression_data as make_regression_data
from ._vae import EMA as EMA
from ._vae import ConditionalVAE as ConditionalVAE
from ._vae import EmaParam as EmaParam
from ._vae import vae_loss as vae_loss
from ._vae import vae_optimizer as vae_optimizer
from ._vae import vae_train_step as vae_train_step
from ._zoo import ZOO as ZOO
from ._zoo import ZooEntry as ZooEntry

# Artifacts holding these Variable types rebuild them as nnx.State in any process
# that imports nnx_models (artifacts never import classes by name).
for _variable_type in (Count, LoraParam, EmaParam, QuantizedParam):
  _register(_variable_type)
