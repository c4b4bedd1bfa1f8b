"""params.yaml as typed, frozen dataclasses: `schema` (the keys), `loading` (the checks), `tracking` (who reads what).

    from skytune.core.params import Params, load_params
"""

from skytune.core.params.loading import ParamsError, load_params
from skytune.core.params.schema import (
    PARAMS_FILE,
    MixParams,
    Params,
    PreferenceParams,
    SourceParams,
    TrainParams,
    adapter_method,
)
from skytune.core.params.tracking import TrackedParams, to_dict

__all__ = ["PARAMS_FILE", "MixParams", "Params", "ParamsError", "PreferenceParams", "SourceParams", "TrackedParams",
           "TrainParams", "adapter_method", "load_params", "to_dict"]
