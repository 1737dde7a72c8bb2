"""What the payments service does with `refund.requested`: submit the refund to the provider.

1. One statement claims the refund for submission (`submitted_at`), if it is still
   pending: from then on the gateway can no longer withdraw it.
2. Ask the provider to refund the payment's charge, under the refund's id as the
   provider's idempotency key.
3. Record the provider's refund id; a refund the provider refused outright (4xx: say the
   charge cannot give that much back) fails with the provider's reason.

A crash anywhere redelivers the message: step 1 finds the refund still pending, step 2
asks again and the provider answers with the same refund, so the provider holds exactly
one refund per refund id however often the message comes. A refund already settled (its
webhook beat the redelivery) is left alone. If the provider stays unreachable the refund
stays pending, and the reconciler asks about it later. The outcome arrives by webhook
(`refund.succeeded` / `refund.failed`), or through the reconciler when it does not.
"""

from __future__ import annotations

import dataclasses
import logging

from libs.common.db import Database
from libs.common.logs import correlation_scope
from libs.common.messages import Envelope, RefundRequested
from libs.common.provider_client import ProviderClient
from libs.common.refund_submission import submit
from libs.common.refunds import claim_submission
from libs.common.states import TransitionSource
from services.payments.metrics import REFUND_REQUESTS

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class RefundSubmission:
    db: Database
    provider: ProviderClient

    async def handle(self, envelope: Envelope[RefundRequested]) -> None:
        refund_id = envelope.payload.refund_id
        with correlation_scope(envelope.correlation_id):
            claimed = await self.db.statement(lambda conn: claim_submission(conn, refund_id))
            if claimed is None:
                REFUND_REQUESTS.labels(outcome="settled_before").inc()
                log.info(
                    "refund not pending (settled or withdrawn): nothing to submit",
                    extra={"refund_id": str(refund_id)},
                )
                return
            outcome = await submit(
                self.db, self.provider, claimed, source=TransitionSource.PROVIDER
            )
            REFUND_REQUESTS.labels(outcome=outcome).inc()
