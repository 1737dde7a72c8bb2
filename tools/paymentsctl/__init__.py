"""`paymentsctl`: the platform's operator command line.

Talks to the gateway's HTTP API (payments, stats, webhooks, reconciliation runs) and,
for the parking queues, to RabbitMQ directly. Configuration comes from the environment
through `libs.common.settings.CtlSettings`; command-line flags override it.

Exit codes: 0 success, 1 the API (or the broker) refused, 2 usage error, 3 cannot
connect or timed out.
"""
