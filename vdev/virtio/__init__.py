"""The virtio spec in code, shared by the driver and the device side (sans-IO).

Nothing here does I/O, starts threads or imports a transport: queues take a memory
object and return decisions; the control codec turns messages into bytes and back.
"""

from .constants import (
    BLK_ID_BYTES,
    MAX_QUEUE_SIZE,
    SECTOR_SIZE,
    BlkF,
    BlkStatus,
    BlkType,
    DeviceId,
    F,
    NetF,
    Status,
    bit,
    feature_names,
)
from .errors import (
    AddressError,
    ChainError,
    DeviceSpecError,
    DriverSpecError,
    ProtocolError,
    QueueFull,
    RingError,
    Rule,
    UsageError,
    VirtioError,
)
from .memory import FlatMemory, GuestMemory, RegionMemory
from .poll import DEFAULT_POLL_US, PollWindow
from .queue import (
    Chain,
    DeviceQueue,
    DeviceQueueStats,
    DriverQueue,
    DriverQueueStats,
    Segment,
    gather,
    scatter,
    slices,
)
from .ring import RingLayout, vring_need_event

__all__ = [
    "BLK_ID_BYTES",
    "MAX_QUEUE_SIZE",
    "SECTOR_SIZE",
    "BlkF",
    "BlkStatus",
    "BlkType",
    "DeviceId",
    "F",
    "NetF",
    "Status",
    "bit",
    "feature_names",
    "AddressError",
    "ChainError",
    "DeviceSpecError",
    "DriverSpecError",
    "ProtocolError",
    "QueueFull",
    "RingError",
    "Rule",
    "UsageError",
    "VirtioError",
    "FlatMemory",
    "GuestMemory",
    "RegionMemory",
    "Chain",
    "DeviceQueue",
    "DeviceQueueStats",
    "DriverQueue",
    "PollWindow",
    "DEFAULT_POLL_US",
    "DriverQueueStats",
    "Segment",
    "gather",
    "scatter",
    "slices",
    "RingLayout",
    "vring_need_event",
]
