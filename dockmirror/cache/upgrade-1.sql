-- Version 1 to 2: version 1 also recorded the blobs a manifest named as held
-- by the manifest's repository, which nobody had proven.  Those records cannot
-- be told from proven ones, so all go: a repository proves each blob again
-- with one HEAD.
DELETE FROM access;
UPDATE version SET version = 2;
