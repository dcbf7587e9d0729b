//go:build linux
// +build linux

/*
Copyright 2026 The Kubernetes Authors.

Licensed under the Apache License, Version 2.0 (the "License");
you may not use this file except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.
*/

package conntrack

// This file sends batched conntrack deletes on the ctnetlink socket.

import (
	"errors"
	"fmt"
	"syscall"
)

const (
	// deleteBatchBytes bounds one sendmsg of delete requests (72 bytes each
	// for IPv4, 96 for IPv6).
	deleteBatchBytes = 1 << 15
	// deleteBatchRequests bounds the requests per sendmsg by count. The kernel
	// handles the whole sendmsg before we read anything and queues one ACK
	// skb per request; each is charged its truesize (several hundred bytes)
	// to the receive buffer, so with the default 208 KiB a few hundred ACKs
	// overflow it, the kernel drops the rest and recvmsg fails with ENOBUFS
	// (the old 32 KiB-only bound allowed 456 IPv4 requests). Found by the
	// kernel test (Linux 6.18, rmem_default 212992): 256 requests per
	// sendmsg fit, 320 overflowed; 128 leaves a 2x margin.
	deleteBatchRequests = 128
)

// deleteFlows deletes each flow by its original tuple, packing up to
// deleteBatchRequests delete requests (and at most deleteBatchBytes) into one
// sendmsg and reading the ACKs in bulk. ENOENT counts as already gone. It
// returns how many entries it deleted and the first other error; the
// remaining batches are still attempted. If ACKs are lost anyway (ENOBUFS)
// the batch's outcome is unknown: that is reported as an error, so the caller
// retries those flows (a repeated delete answers ENOENT).
func (s *ctnlSocket) deleteFlows(family uint8, flows []Flow) (int, error) {
	deleted := 0
	var firstErr error
	fail := func(err error) {
		if firstErr == nil {
			firstErr = err
		}
	}
	buf := make([]byte, recvBufferSize)
	for start := 0; start < len(flows); {
		var batch []byte
		outstanding := map[uint32]bool{}
		end := start
		for end < len(flows) && len(batch) < deleteBatchBytes && end-start < deleteBatchRequests {
			seq := s.nextSeq()
			var err error
			batch, err = appendDeleteRequest(batch, seq, family, flows[end])
			end++
			if err != nil {
				fail(err)
				continue
			}
			outstanding[seq] = true
		}
		start = end
		if len(outstanding) == 0 {
			continue
		}
		if err := s.send(batch); err != nil {
			return deleted, fmt.Errorf("sending %d conntrack deletes: %w", len(outstanding), err)
		}
		// Bounded by the number of requests sent: each gets exactly one ACK.
		// ACKs of an earlier batch whose read failed carry other sequence
		// numbers and are skipped by countAcks.
		for reads := 0; len(outstanding) > 0 && reads <= len(flows); reads++ {
			b, err := s.recv(buf)
			if errors.Is(err, syscall.ENOBUFS) {
				fail(fmt.Errorf("%d conntrack delete ACKs lost: %w", len(outstanding), err))
				break
			}
			if err != nil {
				return deleted, fmt.Errorf("reading conntrack delete ACKs: %w", err)
			}
			d, e, err := countAcks(b, outstanding)
			if err != nil {
				return deleted, err
			}
			deleted += d
			if e != nil {
				fail(e)
			}
		}
	}
	return deleted, firstErr
}

func (kernelTable) deleteFlows(family uint8, flows []Flow) (int, error) {
	s, err := openCTNetlink()
	if err != nil {
		return 0, err
	}
	defer s.Close()
	return s.deleteFlows(family, flows)
}
