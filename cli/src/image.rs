//! `corral image import|pull|ls|rm`: the image store of one agent.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use corral_proto::pb;
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

/// Default agent address, as in Mesos (port 5051).
const DEFAULT_AGENT: &str = "127.0.0.1:5051";
/// Upload chunk size: well under gRPC's default 4 MiB message limit.
const CHUNK: usize = 1024 * 1024;

#[derive(Args)]
pub struct ImageArgs {
    /// Agent whose image store to use.
    #[arg(long, global = true, default_value = DEFAULT_AGENT, env = "CORRAL_AGENT")]
    agent: String,
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Load a `docker save` or OCI image-layout archive (tar or tar.gz).
    Import {
        file: PathBuf,
        /// Reference to tag the image with.
        #[arg(long)]
        name: Option<String>,
    },
    /// Pull an image from a registry into the agent's store.
    Pull {
        reference: String,
        #[arg(long, env = "CORRAL_REGISTRY_USERNAME")]
        username: Option<String>,
        #[arg(long, env = "CORRAL_REGISTRY_PASSWORD")]
        password: Option<String>,
    },
    /// List the images in the agent's store.
    Ls,
    /// Remove an image reference; unused layers are collected.
    Rm { reference: String },
}

async fn client(agent: &str) -> Result<pb::images_client::ImagesClient<Channel>> {
    Ok(
        pb::images_client::ImagesClient::connect(format!("http://{agent}"))
            .await
            .with_context(|| {
                format!("cannot reach the agent at {agent} (set --agent or CORRAL_AGENT)")
            })?
            .max_decoding_message_size(64 * 1024 * 1024),
    )
}

fn print_images(images: &[pb::ImageSummary]) {
    println!("{:<50}  {:<19}  {:>10}  LAYERS", "REFERENCE", "ID", "SIZE");
    for image in images {
        let id: String = image
            .id
            .trim_start_matches("sha256:")
            .chars()
            .take(19)
            .collect();
        let size = format!("{:.1} MiB", image.size_bytes as f64 / (1024.0 * 1024.0));
        let refs = if image.references.is_empty() {
            vec!["<none>".to_string()]
        } else {
            image.references.clone()
        };
        for r in refs {
            println!("{r:<50}  {id:<19}  {size:>10}  {}", image.layers);
        }
    }
}

pub async fn image(args: ImageArgs) -> Result<()> {
    let mut client = client(&args.agent).await?;
    match args.command {
        ImageCommand::Import { file, name } => {
            let mut f = tokio::fs::File::open(&file)
                .await
                .with_context(|| format!("cannot open {}", file.display()))?;
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::ImageChunk>(4);
            let reader = tokio::spawn(async move {
                let mut first = true;
                loop {
                    let mut data = vec![0u8; CHUNK];
                    let n = f.read(&mut data).await?;
                    if n == 0 && !first {
                        return Ok::<(), std::io::Error>(());
                    }
                    data.truncate(n);
                    let chunk = pb::ImageChunk {
                        name: if first {
                            name.clone().unwrap_or_default()
                        } else {
                            String::new()
                        },
                        data,
                    };
                    first = false;
                    if tx.send(chunk).await.is_err() || n == 0 {
                        return Ok(());
                    }
                }
            });
            let response = client
                .import_image(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .with_context(|| format!("importing {}", file.display()))?
                .into_inner();
            reader
                .await
                .context("reader task")?
                .context("reading the archive")?;
            print_images(&response.images);
        }
        ImageCommand::Pull {
            reference,
            username,
            password,
        } => {
            let summary = client
                .pull_image(pb::PullImageRequest {
                    reference: reference.clone(),
                    username: username.unwrap_or_default(),
                    password: password.unwrap_or_default(),
                })
                .await
                .with_context(|| format!("pulling {reference}"))?
                .into_inner();
            print_images(&[summary]);
        }
        ImageCommand::Ls => {
            let list = client
                .list_images(pb::ListImagesRequest {})
                .await?
                .into_inner();
            print_images(&list.images);
        }
        ImageCommand::Rm { reference } => {
            let r = client
                .remove_image(pb::RemoveImageRequest {
                    reference: reference.clone(),
                })
                .await
                .with_context(|| format!("removing {reference}"))?
                .into_inner();
            println!(
                "removed {reference}: {} layers, {:.1} MiB freed",
                r.layers_removed,
                r.bytes_freed as f64 / (1024.0 * 1024.0)
            );
        }
    }
    Ok(())
}
