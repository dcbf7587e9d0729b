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
	"fmt"
)

// deleteBatchBytes bounds one sendmsg of delete requests (~100 bytes each),
// staying well under the socket send buffer.
const deleteBatchBytes = 1 << 15

// deleteFlows deletes each flow by its original tuple, packing as many delete
// requests as fit in deleteBatchBytes into one sendmsg and reading the ACKs in
// bulk. ENOENT counts as already gone. It returns how many entries it deleted
// and the first other error (the remaining batches are still attempted).
func (s *ctnlSocket) deleteFlows(family uint8, flows []Flow) (int, error) {
	deleted := 0
	var firstErr error
	buf := make([]byte, recvBufferSize)
	for start := 0; start < len(flows); {
		var batch []byte
		outstanding := map[uint32]bool{}
		end := start
		for end < len(flows) && len(batch) < deleteBatchBytes {
			seq := s.nextSeq()
			var err error
			batch, err = appendDeleteRequest(batch, seq, family, flows[end])
			end++
			if err != nil {
				if firstErr == nil {
					firstErr = err
				}
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
		for reads := 0; len(outstanding) > 0 && reads <= len(flows); reads++ {
			b, err := s.recv(buf)
			if err != nil {
				return deleted, fmt.Errorf("reading conntrack delete ACKs: %w", err)
			}
			d, e, err := countAcks(b, outstanding)
			if err != nil {
				return deleted, err
			}
			deleted += d
			if firstErr == nil && e != nil {
				firstErr = e
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
