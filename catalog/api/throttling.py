"""Rate limits per client that fail open when their counters are unreachable."""
import logging

from redis.exceptions import RedisError
from rest_framework.throttling import ScopedRateThrottle

logger = logging.getLogger(__name__)


class ScopedRateThrottleFailOpen(ScopedRateThrottle):
    """Per-client rate limits by scope; when the cache holding the counters is down, requests pass.

    Throttling protects the service but is not worth refusing shoppers while Redis restarts; work that
    needs Redis (queued uploads) is refused on its own with a 503.
    """

    def allow_request(self, request, view) -> bool:
        try:
            return super().allow_request(request, view)
        except (RedisError, OSError) as exc:
            logger.warning("throttle counters unavailable (%s); letting the request through", exc)
            return True
