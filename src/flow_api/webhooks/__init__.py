"""Signed webhooks when jobs end (issue 15): subscriptions checked at submit, an outbox swept
by workers, deliveries signed the Standard Webhooks way and retried for about a day."""
