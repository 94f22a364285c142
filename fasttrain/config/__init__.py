from fasttrain.config.schema import *  # noqa: F401,F403 - the schema's names until the module is split
from fasttrain.config.schema import _check_output_dir  # noqa: F401
