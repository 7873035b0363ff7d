"""Tests of the single-module examples: transactional services, the job, the seed issue's app."""
