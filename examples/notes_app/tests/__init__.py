"""The notes service's own tests, written the way an application's tests are."""
