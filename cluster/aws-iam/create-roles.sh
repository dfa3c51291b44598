#!/usr/bin/env bash
# Creates, once per AWS account, the two IAM instance profiles cluster/gpu.yaml names (docs/cluster.md,
# "AWS: IAM"):
#   gan-sweeps-head    role gan-sweeps-head: AWS's AmazonEC2FullAccess (what Ray's own default head role
#                      has, for the autoscaler) + head-policy.json (resolve the Deep Learning AMI parameter,
#                      pass the worker role, read/write s3://gan-sweeps-* buckets);
#   gan-sweeps-worker  role gan-sweeps-worker: worker-policy.json (read/write s3://gan-sweeps-* buckets).
#
#   bash cluster/aws-iam/create-roles.sh    # with credentials that may manage IAM (IAM is global: no region)
#
# Running it again keeps existing roles and profiles and rewrites the inline policies from these files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

profile() {  # NAME POLICY_FILE [MANAGED_POLICY_ARN]
  local name=$1 policy=$2 managed=${3:-}
  if ! aws iam get-role --role-name "$name" > /dev/null 2>&1; then
    aws iam create-role --role-name "$name" --assume-role-policy-document "file://$here/ec2-trust-policy.json" > /dev/null
  fi
  if [ -n "$managed" ]; then
    aws iam attach-role-policy --role-name "$name" --policy-arn "$managed"
  fi
  aws iam put-role-policy --role-name "$name" --policy-name "$name" --policy-document "file://$here/$policy"
  if ! aws iam get-instance-profile --instance-profile-name "$name" > /dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "$name" > /dev/null
    aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
  fi
  echo "instance profile $name: role $name, inline policy $policy${managed:+, $managed}"
}

profile gan-sweeps-worker worker-policy.json
profile gan-sweeps-head head-policy.json arn:aws:iam::aws:policy/AmazonEC2FullAccess
echo "IAM changes take a few seconds to reach EC2: wait ~15 s before the first 'ray up cluster/gpu.yaml'."
