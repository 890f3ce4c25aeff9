"""The ADARTS / PC-DARTS / DARTS search space, networks, architect and training loops."""
from . import genotypes
from .architect import Architect
from .eval_model import EvalNetwork, count_parameters
from .genotypes import PRIMITIVES, Genotype
from .search_model import SearchNetwork, normalized_betas

__all__ = ["genotypes", "Architect", "EvalNetwork", "count_parameters", "PRIMITIVES", "Genotype",
           "SearchNetwork", "normalized_betas"]
