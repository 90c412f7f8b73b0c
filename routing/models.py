from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

from usage.vocabulary import COMPLEXITIES, OVERRIDE_MODEL_CODENAME


class Scope(models.TextChoices):
    GLOBAL = "global", "Global default"
    RUN = "run", "This run only"


class ProviderEndpoint(models.Model):
    """Where a provider is reached, over which wire protocol, which env var holds its key (never
    the key itself) and how genai-prices names it. Read as a routing.providers.Endpoint."""

    name = models.CharField(max_length=50, unique=True)
    # A key of routing.providers.PROVIDERS; not a `choices` field, so that adding a protocol
    # module needs no migration (the admin's form offers the registry's protocols).
    protocol = models.CharField(max_length=30)
    api_key_env = models.CharField(max_length=100)
    base_url = models.URLField(max_length=300)
    # genai-prices' provider id ("zai" for GLM); blank: the protocol's default, else the name.
    prices_id = models.CharField(max_length=50, blank=True, default="")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class CatalogueModel(models.Model):
    """A model Autopack may call, and the provider that serves it."""

    name = models.CharField(max_length=100, unique=True)
    provider = models.CharField(max_length=50)

    class Meta:
        ordering = ["provider", "name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.provider})"


class ModelRoute(models.Model):
    """One row of the mapping: which model serves role × category × complexity.

    Layer `baseline` holds what config/models.yaml says (category "" = the complexity_models
    row); layer `global_override` holds changes a person made with scope global.
    """

    class Layer(models.TextChoices):
        BASELINE = "baseline", "Baseline"
        GLOBAL_OVERRIDE = "global_override", "Global override"

    layer = models.CharField(max_length=20, choices=Layer.choices, default=Layer.BASELINE)
    role = models.CharField(max_length=100)
    category = models.CharField(max_length=64, blank=True, default="")
    complexity = models.CharField(max_length=10)
    model = models.ForeignKey(CatalogueModel, on_delete=models.PROTECT, related_name="routes")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["role", "category", "complexity", "layer"]
        permissions = [(OVERRIDE_MODEL_CODENAME, "Can change model mappings (global or for a run)")]
        constraints = [
            models.UniqueConstraint(
                fields=["layer", "role", "category", "complexity"], name="route_unique_key"
            ),
            models.CheckConstraint(
                condition=Q(complexity__in=list(COMPLEXITIES)),
                name="route_known_complexity",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role} {self.category or '*'}:{self.complexity} → {self.model.name}"


class Fallback(models.Model):
    model = models.ForeignKey(CatalogueModel, on_delete=models.CASCADE, related_name="fallbacks")
    position = models.PositiveSmallIntegerField()
    alternative = models.ForeignKey(CatalogueModel, on_delete=models.CASCADE, related_name="+")

    class Meta:
        ordering = ["model", "position"]
        constraints = [
            models.UniqueConstraint(fields=["model", "position"], name="fallback_unique_position"),
        ]

    def __str__(self) -> str:
        return f"{self.model.name} → {self.alternative.name}"


class RoutingPolicy(models.Model):
    """The single row of router-wide settings; `version` moves on every mapping change so each
    process's in-memory router knows when to reload."""

    class QuotaPolicy(models.TextChoices):
        KEEP_PRIMARY = "keep_primary", "Keep the primary model"
        FAIL_FAST = "fail_fast", "Fail the phase"

    critical_categories = models.JSONField(default=list, blank=True)
    quota_policy = models.CharField(
        max_length=20, choices=QuotaPolicy.choices, default=QuotaPolicy.KEEP_PRIMARY
    )
    version = models.PositiveBigIntegerField(default=1)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "routing policy"
        constraints = [models.CheckConstraint(condition=Q(id=1), name="routing_policy_singleton")]

    def __str__(self) -> str:
        return f"Routing policy (v{self.version})"


class ModelChange(models.Model):
    """Every change of a model mapping: who, when, scope, old and new."""

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    changed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    scope = models.CharField(max_length=10, choices=Scope.choices)
    run_id = models.BigIntegerField(null=True, blank=True)  # not a FK: routing never imports runs
    role = models.CharField(max_length=100)
    category = models.CharField(max_length=64)
    complexity = models.CharField(max_length=10)
    old_model = models.CharField(max_length=100, blank=True, default="")
    new_model = models.CharField(max_length=100)
    via = models.CharField(max_length=30, blank=True, default="", help_text="admin, api, mcp…")

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(scope="global", run_id__isnull=True)
                | Q(scope="run", run_id__isnull=False),
                name="change_run_scope_has_run",
            ),
        ]

    def __str__(self) -> str:
        where = f"run {self.run_id}" if self.run_id else "global"
        key = f"{self.role} {self.category}:{self.complexity}"
        return f"{where}: {key} {self.old_model} → {self.new_model}"


class WorkerProviderReport(models.Model):
    """Which providers one worker process can call: the names of the providers whose key
    variable is set in ITS environment (never a key), written at its start and on each of its
    heartbeats (routing.reach). The web, API and MCP processes make no calls and may run
    without the keys: they read these rows to tell whether a provider is usable."""

    # Names the process (host, pid and start time, runs.holders): a restarted worker gets a
    # row of its own, and the old one ages out.
    worker = models.CharField(max_length=400, unique=True)
    providers = models.JSONField(default=list)
    # Indexed: every check reads only the rows newer than AUTOPACK_WORKER_LOST_AFTER_SECONDS.
    reported_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.worker}: {', '.join(self.providers) or 'no providers'}"


class ProviderLimits(models.Model):
    """The latest limits one provider announced (routing/providers/limits.py), and its cooldown:
    one row per provider, upserted with one statement on every call (routing.services).

    Only the rate-limit headers are kept (`headers`): nothing else a response carried."""

    provider = models.CharField(max_length=50, unique=True)
    observed_at = models.DateTimeField()
    requests_limit = models.PositiveBigIntegerField(null=True, blank=True)
    requests_remaining = models.PositiveBigIntegerField(null=True, blank=True)
    requests_reset_at = models.DateTimeField(null=True, blank=True)
    tokens_limit = models.PositiveBigIntegerField(null=True, blank=True)
    tokens_remaining = models.PositiveBigIntegerField(null=True, blank=True)
    tokens_reset_at = models.DateTimeField(null=True, blank=True)
    retry_after_until = models.DateTimeField(null=True, blank=True)
    headers = models.JSONField(default=dict, blank=True)
    # Not called before this instant (the router treats it as at its hard cap); the reason says
    # what the provider answered ("429 from anthropic", "2,000 tokens left, 5,000 needed").
    cooled_until = models.DateTimeField(null=True, blank=True)
    reason = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        verbose_name_plural = "provider limits"
        ordering = ["provider"]

    def __str__(self) -> str:
        return f"{self.provider} limits at {self.observed_at:%Y-%m-%d %H:%M:%S}"
