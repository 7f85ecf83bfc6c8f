"""Distribution strategies that keep ``model.fit`` while making training
asynchronous (parameter server), local-update (periodic averaging) or
simulated-asynchronous (one device, deterministic staleness)."""

__all__: list = []
from tf_async.strategies.simulated_async import SimulatedAsyncStrategy  # noqa: E402
__all__ += ["SimulatedAsyncStrategy"]
from tf_async.strategies.local_update import LocalUpdateStrategy  # noqa: E402
__all__ += ["LocalUpdateStrategy"]
from tf_async.strategies.async_parameter_server import AsyncParameterServerStrategy  # noqa: E402
__all__ += ["AsyncParameterServerStrategy"]
from tf_async.strategies._nonfinite import NonFiniteStepError  # noqa: E402
__all__ += ["NonFiniteStepError"]
