"""dspex-trio: serve DSPy programs from a supervised pool of worker processes, with Trio.

Everything an application uses is re-exported here (the list, and why each other name is not: the
"Public surface" of ``docs/architecture.md``); the modules behind it are private, and what they hold
beyond these names stays importable from them, with no promise. The pytest plugin and the fake LM server
are the public subpackage :mod:`dspex_trio.testing`.
"""

from dspex_trio._backend import Backend as Backend
from dspex_trio._breaker import CircuitState as CircuitState
from dspex_trio._client import ClientOptions as ClientOptions
from dspex_trio._client import ConnectionLost as ConnectionLost
from dspex_trio._client import HandshakeRefused as HandshakeRefused
from dspex_trio._client import RemoteBackend as RemoteBackend
from dspex_trio._client import RemoteProtocolError as RemoteProtocolError
from dspex_trio._client import RemoteStatistics as RemoteStatistics
from dspex_trio._client import connect as connect
from dspex_trio._client_lm import NamedLM as NamedLM
from dspex_trio._compile import CompileProgress as CompileProgress
from dspex_trio._compile import CompileResult as CompileResult
from dspex_trio._errors import AllLMsFailed as AllLMsFailed
from dspex_trio._errors import CallTimeout as CallTimeout
from dspex_trio._errors import DspexError as DspexError
from dspex_trio._errors import ExitStatus as ExitStatus
from dspex_trio._errors import InvalidParams as InvalidParams
from dspex_trio._errors import JobCancelled as JobCancelled
from dspex_trio._errors import JobFailed as JobFailed
from dspex_trio._errors import LimitExceeded as LimitExceeded
from dspex_trio._errors import Overloaded as Overloaded
from dspex_trio._errors import PoolUnavailable as PoolUnavailable
from dspex_trio._errors import ProgramError as ProgramError
from dspex_trio._errors import ProgramModuleError as ProgramModuleError
from dspex_trio._errors import ProgramNotFound as ProgramNotFound
from dspex_trio._errors import ProtocolError as ProtocolError
from dspex_trio._errors import SessionNotFound as SessionNotFound
from dspex_trio._errors import UnknownMethod as UnknownMethod
from dspex_trio._errors import WorkerClosed as WorkerClosed
from dspex_trio._errors import WorkerCrashed as WorkerCrashed
from dspex_trio._errors import WorkerError as WorkerError
from dspex_trio._errors import WorkerStartFailed as WorkerStartFailed
from dspex_trio._errors import WorkerUnresponsive as WorkerUnresponsive
from dspex_trio._events import HealthEvent as HealthEvent
from dspex_trio._events import Subscription as Subscription
from dspex_trio._exports import fixup_module_metadata as _fixup_module_metadata
from dspex_trio._fallback import open_backend as open_backend
from dspex_trio._health import HealthSnapshot as HealthSnapshot
from dspex_trio._health import WorkerHealth as WorkerHealth
from dspex_trio._http_routes import serve_http as serve_http
from dspex_trio._jobs import EvaluationResult as EvaluationResult
from dspex_trio._jobs import ExampleResult as ExampleResult
from dspex_trio._jobs import JobProgress as JobProgress
from dspex_trio._lm_budgets import LMBudget as LMBudget
from dspex_trio._lm_budgets import LMStatistics as LMStatistics
from dspex_trio._lm_cache import LMCache as LMCache
from dspex_trio._metrics import RuntimeCollector as RuntimeCollector
from dspex_trio._options import PoolOptions as PoolOptions
from dspex_trio._options import WorkerOptions as WorkerOptions
from dspex_trio._pool import Pool as Pool
from dspex_trio._pool import open_pool as open_pool
from dspex_trio._ray_launcher import RayLauncher as RayLauncher
from dspex_trio._retry import RetryPolicy as RetryPolicy
from dspex_trio._shared_launcher import LauncherMismatch as LauncherMismatch
from dspex_trio._shared_launcher import SharedLauncher as SharedLauncher
from dspex_trio._shared_launcher import open_launcher as open_launcher
from dspex_trio._states import WorkerState as WorkerState
from dspex_trio._statistics import BackendStatistics as BackendStatistics
from dspex_trio._statistics import FallbackStatistics as FallbackStatistics
from dspex_trio._statistics import LatencySummary as LatencySummary
from dspex_trio._statistics import PoolStatistics as PoolStatistics
from dspex_trio._statistics import WorkerStatistics as WorkerStatistics
from dspex_trio._tracing import disable_tracing as disable_tracing
from dspex_trio._tracing import enable_tracing as enable_tracing
from dspex_trio._websocket import WebsocketServer as WebsocketServer
from dspex_trio._websocket import WebsocketStatistics as WebsocketStatistics
from dspex_trio._websocket import serve_websocket as serve_websocket
from dspex_trio._worker import CallStream as CallStream
from dspex_trio._worker import Worker as Worker
from dspex_trio._worker import open_worker as open_worker
from dspex_trio._ws_options import WebsocketOptions as WebsocketOptions

__version__ = "0.1.0"

_fixup_module_metadata(__name__, globals())
del _fixup_module_metadata
