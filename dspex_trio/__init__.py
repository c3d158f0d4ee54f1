"""dspex-trio: serve DSPy programs from a supervised pool of worker processes, with Trio.

Everything public is re-exported here; the modules behind it are private.
"""

from dspex_trio._backends import Backend as Backend
from dspex_trio._backends import BackendStatistics as BackendStatistics
from dspex_trio._backends import BridgeBackend as BridgeBackend
from dspex_trio._backends import FallbackBackend as FallbackBackend
from dspex_trio._backends import FallbackStatistics as FallbackStatistics
from dspex_trio._backends import MockBackend as MockBackend
from dspex_trio._backends import open_backend as open_backend
from dspex_trio._breaker import BreakerStatistics as BreakerStatistics
from dspex_trio._breaker import CircuitBreaker as CircuitBreaker
from dspex_trio._breaker import CircuitState as CircuitState
from dspex_trio._errors import CallTimeout as CallTimeout
from dspex_trio._errors import DspexError as DspexError
from dspex_trio._errors import ExitStatus as ExitStatus
from dspex_trio._errors import InvalidParams as InvalidParams
from dspex_trio._errors import Overloaded as Overloaded
from dspex_trio._errors import PoolUnavailable as PoolUnavailable
from dspex_trio._errors import ProgramError as ProgramError
from dspex_trio._errors import ProgramNotFound as ProgramNotFound
from dspex_trio._errors import ProtocolError as ProtocolError
from dspex_trio._errors import UnknownMethod as UnknownMethod
from dspex_trio._errors import WorkerClosed as WorkerClosed
from dspex_trio._errors import WorkerCrashed as WorkerCrashed
from dspex_trio._errors import WorkerError as WorkerError
from dspex_trio._errors import WorkerStartFailed as WorkerStartFailed
from dspex_trio._errors import WorkerUnresponsive as WorkerUnresponsive
from dspex_trio._events import EventBus as EventBus
from dspex_trio._events import HealthEvent as HealthEvent
from dspex_trio._events import Subscription as Subscription
from dspex_trio._launcher import Launcher as Launcher
from dspex_trio._launcher import SubprocessLauncher as SubprocessLauncher
from dspex_trio._launcher import WorkerSpec as WorkerSpec
from dspex_trio._pool import HealthSnapshot as HealthSnapshot
from dspex_trio._pool import LatencySummary as LatencySummary
from dspex_trio._pool import Pool as Pool
from dspex_trio._pool import PoolOptions as PoolOptions
from dspex_trio._pool import PoolStatistics as PoolStatistics
from dspex_trio._pool import WorkerHealth as WorkerHealth
from dspex_trio._pool import open_pool as open_pool
from dspex_trio._retry import RetryPolicy as RetryPolicy
from dspex_trio._states import WorkerState as WorkerState
from dspex_trio._websocket import WebsocketOptions as WebsocketOptions
from dspex_trio._websocket import WebsocketServer as WebsocketServer
from dspex_trio._websocket import WebsocketStatistics as WebsocketStatistics
from dspex_trio._websocket import serve_websocket as serve_websocket
from dspex_trio._worker import CallStream as CallStream
from dspex_trio._worker import Worker as Worker
from dspex_trio._worker import WorkerOptions as WorkerOptions
from dspex_trio._worker import WorkerStatistics as WorkerStatistics
from dspex_trio._worker import open_worker as open_worker

__version__ = "0.1.0"
