from fasttrain.models.imported import *  # noqa: F401,F403 - until the module is split
from fasttrain.models.tutorial import *  # noqa: F401,F403
