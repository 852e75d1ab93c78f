"""Test doubles that live outside production code: tiny random-weight models saved to local folders."""
