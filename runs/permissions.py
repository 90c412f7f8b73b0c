"""API permissions: staff may read; controlling runs and changing models need a permission a
person grants in the admin (runs.control_run, routing.override_model)."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request


class IsStaffReader(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        return bool(request.user and request.user.is_authenticated and request.user.is_staff)


def requires(perm: str) -> type[BasePermission]:
    class HasPermission(BasePermission):
        message = f"You need the '{perm}' permission for this."

        def has_permission(self, request: Request, view: Any) -> bool:
            user = request.user
            return bool(user and user.is_authenticated and user.is_staff and user.has_perm(perm))

    HasPermission.__name__ = f"Has_{perm.replace('.', '_')}"
    return HasPermission


CanControlRuns = requires("runs.control_run")
CanOverrideModels = requires("routing.override_model")
