#!/usr/bin/env bash
# GIT_ASKPASS on a node (sky/node.sh sets it when GIT_TOKEN is given): git and DVC (scmrepo) ask it for the https
# credentials, and it answers from the environment, so the token is never written to .git/config or to disk.
# GIT_USERNAME: x-access-token (GitHub); any non-empty name works for GitLab/Bitbucket tokens, or set theirs.
case "${1:-}" in
  Username*) echo "${GIT_USERNAME:-x-access-token}" ;;
  *) echo "${GIT_TOKEN:-}" ;;
esac
