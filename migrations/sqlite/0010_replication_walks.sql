-- A replication job's partitioned catalog walk (issue 14): the key ranges it has left to list, as JSON
-- ({"ranges":[{"position":..,"end":..}],"unsorted":false}). NULL in a job saved before: its walk is one range
-- after its `position`.
ALTER TABLE replication_jobs ADD COLUMN walk TEXT;
