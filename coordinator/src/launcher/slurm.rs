//! `launcher: slurm`: workers as `srun` steps inside the allocation the coordinator runs in.
//!
//! Each worker is its own single-task step (`srun --overlap --nodes=1 --ntasks=1 --nodelist=N`),
//! so a task's exit is its srun's exit (attributed to a rank and node), stopping the workers ends
//! their steps and never the user's allocation, and one failed task can later be replaced while
//! the others keep running. The coordinator reads the allocation from the environment sbatch or
//! salloc set: SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_TASKS_PER_NODE, SLURM_CPUS_PER_TASK.

use super::children::Children;
use super::{BoxFuture, LaunchError, LaunchPlan, Launcher, LauncherEvent};
use std::time::Duration;
use tokio::process::Command;
use tokio::sync::mpsc;

/// The example batch script users start from; named in errors.
pub const EXAMPLE_SCRIPT: &str = "deploy/slurm/ferrotune.sbatch";
/// Every worker step is named `<prefix><index>`, so a forced stop can find and cancel exactly
/// the steps this coordinator started.
const STEP_NAME_PREFIX: &str = "ferrotune-worker-";

#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("launcher: slurm runs inside a Slurm allocation, and SLURM_JOB_ID is not set")]
    NotInAllocation,
    #[error("{name}={value:?} cannot be read: {why}")]
    BadEnvironment {
        name: &'static str,
        value: String,
        why: String,
    },
    #[error("cluster.world_size is {world_size}, but the allocation holds {capacity} tasks ({tasks_per_node} per node on {nodes})")]
    TooSmall {
        world_size: u32,
        capacity: u32,
        tasks_per_node: String,
        nodes: String,
    },
    #[error("`scontrol show hostnames {list}` failed: {message}")]
    Scontrol { list: String, message: String },
}

impl SlurmError {
    /// What the user should do about it.
    pub fn hint(&self) -> String {
        match self {
            SlurmError::NotInAllocation => format!(
                "submit the job with `sbatch {EXAMPLE_SCRIPT}` (or run `coordinator launch` inside `salloc`); to run on this machine alone use launcher: local"
            ),
            SlurmError::TooSmall { .. } => "ask for more tasks (#SBATCH --nodes / --ntasks-per-node), lower cluster.world_size, or set world_size: auto to use the allocation's task count".into(),
            SlurmError::BadEnvironment { .. } | SlurmError::Scontrol { .. } => {
                "run inside an sbatch or salloc allocation of a working Slurm cluster".into()
            }
        }
    }
}

/// The allocation, as Slurm describes it to the batch script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub job_id: String,
    /// Node names, expanded, in allocation order.
    pub nodes: Vec<String>,
    /// Tasks each node may run, aligned with `nodes`.
    pub tasks_per_node: Vec<u32>,
    pub cpus_per_task: Option<u32>,
}

impl Allocation {
    /// Reads the allocation from `env`; node lists like `n[1-3,7]` are expanded by
    /// `scontrol show hostnames`, Slurm's own parser.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Allocation, SlurmError> {
        let job_id = env("SLURM_JOB_ID")
            .filter(|v| !v.is_empty())
            .ok_or(SlurmError::NotInAllocation)?;
        let required = |name: &'static str| {
            env(name).ok_or_else(|| SlurmError::BadEnvironment {
                name,
                value: String::new(),
                why: "not set inside the allocation".into(),
            })
        };
        let list = required("SLURM_JOB_NODELIST")?;
        let nodes = expand_hostnames(&list)?;
        let tasks_text = required("SLURM_TASKS_PER_NODE")?;
        let tasks_per_node =
            parse_tasks_per_node(&tasks_text).map_err(|why| SlurmError::BadEnvironment {
                name: "SLURM_TASKS_PER_NODE",
                value: tasks_text.clone(),
                why,
            })?;
        if tasks_per_node.len() != nodes.len() {
            return Err(SlurmError::BadEnvironment {
                name: "SLURM_TASKS_PER_NODE",
                value: tasks_text,
                why: format!(
                    "counts {} nodes, SLURM_JOB_NODELIST={list} names {}",
                    tasks_per_node.len(),
                    nodes.len()
                ),
            });
        }
        let cpus_per_task = match env("SLURM_CPUS_PER_TASK") {
            None => None,
            Some(v) => Some(v.trim().parse().map_err(|_| SlurmError::BadEnvironment {
                name: "SLURM_CPUS_PER_TASK",
                value: v.clone(),
                why: "not a whole number".into(),
            })?),
        };
        Ok(Allocation {
            job_id,
            nodes,
            tasks_per_node,
            cpus_per_task,
        })
    }

    pub fn capacity(&self) -> u32 {
        self.tasks_per_node.iter().sum()
    }

    /// Where each of `world_size` workers runs: (node, index on that node), filling nodes in
    /// allocation order as `srun --distribution=block` would.
    pub fn placements(&self, world_size: u32) -> Result<Vec<(String, u32)>, SlurmError> {
        if world_size > self.capacity() {
            return Err(SlurmError::TooSmall {
                world_size,
                capacity: self.capacity(),
                tasks_per_node: self
                    .tasks_per_node
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                nodes: self.nodes.join(","),
            });
        }
        let mut out = Vec::new();
        for (node, &n) in self.nodes.iter().zip(&self.tasks_per_node) {
            for local in 0..n {
                if out.len() as u32 == world_size {
                    return Ok(out);
                }
                out.push((node.clone(), local));
            }
        }
        Ok(out)
    }
}

/// `SLURM_TASKS_PER_NODE` as Slurm writes it: `2(x3),1` means 2, 2, 2, 1.
pub fn parse_tasks_per_node(text: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in text.trim().split(',') {
        let (count, repeat) = match part.split_once("(x") {
            Some((count, rest)) => {
                let repeat = rest
                    .strip_suffix(')')
                    .ok_or_else(|| format!("`{part}` lacks its closing parenthesis"))?;
                (count, repeat)
            }
            None => (part, "1"),
        };
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("`{count}` in `{part}` is not a task count"))?;
        let repeat: u32 = repeat
            .trim()
            .parse()
            .map_err(|_| format!("`{repeat}` in `{part}` is not a repeat count"))?;
        out.extend(std::iter::repeat_n(count, repeat as usize));
    }
    Ok(out)
}

/// Expands a Slurm host list (`n[1-3,7]`) with `scontrol show hostnames`.
pub fn expand_hostnames(list: &str) -> Result<Vec<String>, SlurmError> {
    let out = std::process::Command::new("scontrol")
        .args(["show", "hostnames", list])
        .output()
        .map_err(|e| SlurmError::Scontrol {
            list: list.into(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(SlurmError::Scontrol {
            list: list.into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    if names.is_empty() {
        return Err(SlurmError::Scontrol {
            list: list.into(),
            message: "it printed no host names".into(),
        });
    }
    Ok(names)
}

impl SlurmLauncher {
    /// Starts the worker of slot `index` as its own step (its log is continued when `append`).
    fn start(
        &mut self,
        plan: &LaunchPlan,
        index: usize,
        append: bool,
        events: &mpsc::UnboundedSender<LauncherEvent>,
    ) -> Result<(), LaunchError> {
        let srun = std::path::PathBuf::from("srun");
        let (node, local_index) = &self.placements[index];
        // Stable across a restart of the same slot, and distinct from every other task.
        let worker_id = format!("{}.{index}", self.allocation.job_id);
        let mut cmd = Command::new(&srun);
        cmd.args(self.step_options(node, index));
        cmd.arg(&plan.worker_binary)
            .arg("run")
            .arg("--coordinator")
            .arg(&plan.coordinator_url)
            .arg("--worker-id")
            .arg(&worker_id)
            .arg("--local-index")
            .arg(local_index.to_string())
            // srun passes this environment on to the task; argv would show in `ps`.
            .env(ferrotune_proto::TOKEN_ENV, &plan.token);
        let log = plan.log_dir.join(format!("worker-{index}.log"));
        self.children
            .spawn(cmd, &srun, worker_id, log, append, events)
    }
}

pub struct SlurmLauncher {
    allocation: Allocation,
    placements: Vec<(String, u32)>,
    children: Children,
    /// One GPU per task (`--gpus-per-task=1`): each worker sees exactly its own device.
    gpu_per_task: bool,
}

impl SlurmLauncher {
    /// Checks that the allocation can hold `world_size` workers; nothing starts here.
    pub fn new(allocation: Allocation, world_size: u32) -> Result<Self, SlurmError> {
        let placements = allocation.placements(world_size)?;
        Ok(SlurmLauncher {
            allocation,
            placements,
            children: Children::default(),
            gpu_per_task: false,
        })
    }

    /// Binds one GPU to every worker step (the job's nodes have GPUs: `gpus_per_node` or
    /// `device: cuda`).
    pub fn with_gpu_per_task(mut self, bind: bool) -> Self {
        self.gpu_per_task = bind;
        self
    }

    /// The srun options of the worker step of slot `index` on `node`.
    fn step_options(&self, node: &str, index: usize) -> Vec<String> {
        let mut options: Vec<String> = ["--overlap", "--nodes=1", "--ntasks=1"]
            .map(String::from)
            .to_vec();
        options.push(format!("--nodelist={node}"));
        options.push(format!("--job-name={STEP_NAME_PREFIX}{index}"));
        if let Some(cpus) = self.allocation.cpus_per_task {
            options.push(format!("--cpus-per-task={cpus}"));
        }
        if self.gpu_per_task {
            options.push("--gpus-per-task=1".into());
        }
        options
    }

    /// Cancels the steps this coordinator started that are still known to Slurm (after srun
    /// itself had to be killed). Only `JOB.STEP` ids are cancelled, never the job.
    async fn cancel_own_steps(&self) {
        let listed = Command::new("squeue")
            .args(["--noheader", "--steps", "--jobs", &self.allocation.job_id])
            .args(["--format", "%i %j"])
            .output();
        let Ok(Ok(out)) = tokio::time::timeout(Duration::from_secs(10), listed).await else {
            tracing::warn!("could not list this job's steps with squeue");
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut fields = line.split_whitespace();
            let (Some(step), Some(name)) = (fields.next(), fields.next()) else {
                continue;
            };
            if !name.starts_with(STEP_NAME_PREFIX) || !step.contains('.') {
                continue;
            }
            tracing::warn!(%step, "cancelling worker step");
            let cancel = Command::new("scancel")
                .args(["--quiet", "--signal=KILL", step])
                .status();
            let _ = tokio::time::timeout(Duration::from_secs(10), cancel).await;
        }
    }
}

impl Launcher for SlurmLauncher {
    fn spawn(
        &mut self,
        plan: &LaunchPlan,
        events: mpsc::UnboundedSender<LauncherEvent>,
    ) -> Result<(), LaunchError> {
        plan.create_log_dir()?;
        for index in 0..self.placements.len() {
            self.start(plan, index, false, &events)?;
        }
        Ok(())
    }

    fn replace(
        &mut self,
        plan: &LaunchPlan,
        worker_ids: &[String],
        events: mpsc::UnboundedSender<LauncherEvent>,
    ) -> Result<(), LaunchError> {
        let prefix = format!("{}.", self.allocation.job_id);
        for id in worker_ids {
            let Some(index) = id
                .strip_prefix(&prefix)
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|&i| i < self.placements.len())
            else {
                tracing::warn!(worker_id = %id, "not a task this launcher started; not replaced");
                continue;
            };
            // A new single-task step on the same node, inside the allocation: the other steps
            // keep running.
            self.children.retire(id);
            self.start(plan, index, true, &events)?;
        }
        Ok(())
    }

    fn stop_all(&mut self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // srun forwards SIGTERM to its task and ends the step.
            if self.children.stop_all(grace).await {
                self.cancel_own_steps().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_per_node_expands_repeats() {
        assert_eq!(parse_tasks_per_node("2(x3),1").unwrap(), vec![2, 2, 2, 1]);
        assert_eq!(parse_tasks_per_node("4").unwrap(), vec![4]);
        assert_eq!(parse_tasks_per_node("1(x2)").unwrap(), vec![1, 1]);
        assert!(parse_tasks_per_node("2(x3")
            .unwrap_err()
            .contains("parenthesis"));
        assert!(parse_tasks_per_node("two").is_err());
        assert!(parse_tasks_per_node("").is_err());
    }

    fn allocation(tasks: &[u32]) -> Allocation {
        Allocation {
            job_id: "77".into(),
            nodes: (1..=tasks.len()).map(|i| format!("n{i}")).collect(),
            tasks_per_node: tasks.to_vec(),
            cpus_per_task: None,
        }
    }

    #[test]
    fn workers_fill_nodes_in_allocation_order() {
        let a = allocation(&[2, 1, 2]);
        assert_eq!(a.capacity(), 5);
        let p = a.placements(4).unwrap();
        let want: Vec<(String, u32)> = [("n1", 0), ("n1", 1), ("n2", 0), ("n3", 0)]
            .iter()
            .map(|(n, i)| (n.to_string(), *i))
            .collect();
        assert_eq!(p, want);
    }

    #[test]
    fn a_world_size_the_allocation_cannot_hold_is_refused() {
        let e = allocation(&[1, 1]).placements(3).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cluster.world_size is 3, but the allocation holds 2 tasks (1,1 per node on n1,n2)"
        );
        assert!(e.hint().contains("world_size: auto"));
    }

    #[test]
    fn outside_an_allocation_the_error_points_at_sbatch() {
        let e = Allocation::from_env(&|_| None).unwrap_err();
        assert!(matches!(e, SlurmError::NotInAllocation));
        assert!(e.hint().contains(EXAMPLE_SCRIPT), "{}", e.hint());
    }

    #[test]
    fn gpu_jobs_bind_one_gpu_to_each_worker_step() {
        let cpu = SlurmLauncher::new(allocation(&[2]), 2).unwrap();
        let options = cpu.step_options("n1", 1);
        assert_eq!(
            options,
            [
                "--overlap",
                "--nodes=1",
                "--ntasks=1",
                "--nodelist=n1",
                "--job-name=ferrotune-worker-1"
            ]
        );
        let gpu = SlurmLauncher::new(allocation(&[2]), 2)
            .unwrap()
            .with_gpu_per_task(true);
        assert_eq!(
            gpu.step_options("n1", 0).last().unwrap(),
            "--gpus-per-task=1"
        );
    }
}
