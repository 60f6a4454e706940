"""Instrumentation: identity taps at named sites, hook context managers, interventions."""
